"""Stages 2 and 3 through the real configs: aligner swaps by YAML, third-party aligners by short
name, what trains and what stays frozen, what the checkpoint holds, and the enhancer at init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tadm.contracts import ALIGNERS, TimestepAligner
from tadm.ops.diffusion import abar_at, x0_from_output
from tadm.training.lightning_module import TADMModule
from tests.helpers import CONFIGS
from tests.helpers.cli import build_cli, fit_and_check, stage_args


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


_args = stage_args
_cli = build_cli


def test_spatial_map_drives_the_x0_formula_in_learned_t_mode() -> None:
    """spatial_tpm with mode learned_t: a per-pixel alpha-bar in the fixed branch trains and validates."""
    extra = [
        "--config",
        str(CONFIGS / "aligner" / "spatial_tpm.yaml"),
        "--model.enhancer.init_args.mode=learned_t",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1",
    ]
    cli = _cli(_args(extra=extra))
    done = fit_and_check(cli)
    assert any(n.startswith("aligner.") for n in done["changed"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/psnr_y"])


@ALIGNERS.register("test_half_aligner")
class HalfwayAligner(TimestepAligner):
    """A third-party aligner defined outside the packages: always t = 100."""

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return torch.full((z_hat.shape[0],), 100.0, device=z_hat.device)


def test_third_party_aligner_chosen_by_short_name() -> None:
    cli = _cli(_args(extra=["--model.aligner=test_half_aligner"]))
    assert type(cli.model.aligner) is HalfwayAligner


def test_enhancer_at_init_equals_the_fixed_branch() -> None:
    """The Refiner's last conv is zero: z0_hat is exactly the one-step x0 estimate at t0 = 50."""
    m = _cli(_args(extra=["--config", str(CONFIGS / "aligner" / "tpm.yaml")])).model.eval()
    z_hat = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        z0, t = m.model.enhance(z_hat)
        out = m.backbone.predict(z_hat, t)
        ref = x0_from_output(z_hat, out, abar_at(m.backbone.alphas_cumprod, 50.0), m.backbone.prediction_type)
    assert m.backbone.prediction_type == "v_prediction"
    assert ((t >= 10) & (t <= 200)).all()
    torch.testing.assert_close(z0, ref, rtol=0, atol=0)


def _snapshot(m: TADMModule) -> dict[str, Tensor]:
    """The plain model's parameters, under the names checkpoints store."""
    return {k: v.detach().clone() for k, v in m.model.named_parameters()}


@pytest.mark.parametrize("stage", ["enhancer", "joint"])
def test_frozen_stay_frozen_and_trainable_change(stage: str) -> None:
    cli = _cli(_args(stage=stage, extra=["--trainer.max_steps=3"]))
    m = cli.model
    before = _snapshot(m)
    cli.trainer.fit(m, datamodule=cli.datamodule)
    after = _snapshot(m)
    trainable = {n for n, _ in m.named_trainable_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen_changed = changed - trainable
    assert not frozen_changed, sorted(frozen_changed)[:5]
    for must in ("backbone.unet.conv_in.weight", "aligner.", "enhancer.refiner.", "lora_B"):
        assert any(must in n for n in changed), f"nothing matching {must!r} was trained"
    assert any(n.startswith("backbone.vae.decoder.") for n in changed)
    assert not any(n.startswith("backbone.vae.encoder.") for n in changed)
    assert any(n.startswith("rescaler.") for n in changed) == (stage == "joint")


def test_joint_step_runs_the_rescaler_round_trip_once() -> None:
    """Stage 3 enhances the z_hat its stage-1 loss terms computed; no second DFRM pass."""
    m = _cli(_args(stage="joint")).model
    calls = {"up": 0}
    up = m.rescaler.upscale

    def counted(y: Tensor) -> Tensor:
        calls["up"] += 1
        return up(y)

    m.rescaler.upscale = counted  # type: ignore[method-assign]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    loss = m.training_step({"image": x}, 0)
    assert calls["up"] == 1 and torch.isfinite(loss)
    loss.backward()
    assert m.rescaler.decoder[-1].weight.grad is not None  # the enhancer's loss reaches the DFRM


def test_stage2_checkpoint_holds_only_trained_parts_and_names_backbone(tmp_path: Path) -> None:
    ckpt_cb = json.dumps(
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path), "save_last": True},
            }
        ]
    )
    cli = _cli(
        _args(
            extra=[
                "--trainer.max_steps=1",
                "--trainer.enable_checkpointing=true",
                f"--trainer.callbacks={ckpt_cb}",
            ]
        )
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    allowed = ("rescaler.", "aligner.", "enhancer.", "backbone.unet.conv_in.")
    bad = [k for k in keys if not (k.startswith(allowed) or ".lora_" in k)]
    assert not bad, bad[:5]
    assert not any(k.startswith("perceptual.") for k in keys)
    assert any(".lora_" in k and k.startswith("backbone.vae.decoder.") for k in keys)
    assert ckpt["tadm"]["stage"] == "enhancer"
    # a stage-3 model initialised from it gets the trained LoRA ...
    m3 = _cli(_args(stage="joint", extra=[f"--model.init_from={tmp_path / 'last.ckpt'}"])).model
    k = next(k for k in keys if ".lora_B." in k and k.startswith("backbone.unet."))
    torch.testing.assert_close(m3.model.state_dict()[k], ckpt["state_dict"][k])
    # ... and a model on another backbone refuses it, naming both
    with pytest.raises(ValueError, match=r"tiny-sd21.*tiny-sdxl"):
        _cli(_args(stage="joint", preset="tiny-sdxl", extra=[f"--model.init_from={tmp_path / 'last.ckpt'}"]))
