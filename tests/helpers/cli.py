"""The real CLI on the real configs, shrunk to tiny backbones (lightning-hydra-template style)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from tadm.commands.lightning import TADMCLI
from tadm.config.plugins import load_plugins
from tadm.testing.twins import twin_args
from tadm.training.lightning_module import TADMModule
from tests.helpers import CONFIGS, TRAIN, VAL


def build_cli(args: list[str], configure: bool = True) -> TADMCLI:
    """The objects ``tadm fit ARGS`` would build, without running anything; with ``configure`` also what a
    trainer does first (``configure_model``: the frozen backbone and ``init_from`` load)."""
    load_plugins()
    cli = TADMCLI(TADMModule, L.LightningDataModule, subclass_mode_data=True, run=False, args=args)
    if configure:
        cli.model.configure_model()
    return cli


def data_args(crop: int = 64, batch: int = 2, val: str | Path = VAL) -> list[str]:
    """The bundled sample photos as train / val folders (another ``val`` folder: the ``small_val`` fixture's)."""
    return [
        f"--data.init_args.train_dir={TRAIN}",
        f"--data.init_args.val_dir={val}",
        f"--data.init_args.crop_size={crop}",
        f"--data.init_args.batch_size={batch}",
    ]


def one_cpu_quiet_args() -> list[str]:
    """Trainer overrides of a test run: one CPU device, no logger, validation, checkpoints or callbacks."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
    ]


def stage_args(
    stage: str = "enhancer",
    preset: str = "tiny-sd21",
    extra: list[str] | None = None,
    root: Path | None = None,
) -> list[str]:
    """``configs/experiments/{stage}_x16.yaml`` on a tiny backbone, a slim DFRM, CPU, no logger."""
    args = [
        "--config",
        str(CONFIGS / "experiments" / f"{stage}_x16.yaml"),
        *twin_args(preset),
        "--model.backbone.init_args.gradient_checkpointing=false",
        "--model.rescaler.init_args.width=16",
        "--model.rescaler.init_args.num_resblocks=1",
        "--model.init_from=null",
        "--trainer.precision=32-true",
        "--trainer.accumulate_grad_batches=1",
        *one_cpu_quiet_args(),
        *data_args(crop=64, batch=1),
        "--data.init_args.num_workers=0",
    ]
    if root is not None:
        args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    return args + list(extra or [])


def fit_and_check(cli: TADMCLI, steps: int = 1) -> dict[str, set[str]]:
    """Fit, then check what a training run must leave behind: ``steps`` optimiser steps, a finite loss,
    frozen weights untouched, every trained part moved, and a checkpoint that holds the trained tensors
    (plus the frozen rescaler of stage 2) but never the frozen backbone.

    Returns the parameter names that ``trainable`` / ``changed`` / ``stored`` (in a checkpoint).
    """
    import torch

    m = cli.model
    model = m.model  # the plain model: its parameter names are the ones checkpoints store
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cli.trainer.fit(m, datamodule=cli.datamodule)
    assert cli.trainer.global_step == steps
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    trained_ids = {id(p) for p in m.trainable_parameters()}
    trainable = {n for n, p in model.named_parameters() if id(p) in trained_ids}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert trainable, "the stage trains nothing"
    assert not changed - trainable, f"frozen weights changed: {sorted(changed - trainable)[:5]}"
    parts = {
        n.split(".")[0] if not n.startswith("backbone.") else ".".join(n.split(".")[:2]) for n in trainable
    }
    for part in parts:
        assert any(n.startswith(part + ".") for n in changed), f"nothing in {part} was trained"
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    params = dict(model.named_parameters())
    stored = {k for k in checkpoint["state_dict"] if k in params}
    assert trainable <= stored, f"checkpoint lacks trained tensors {sorted(trainable - stored)[:5]}"
    # besides what this stage trained, only the (frozen, stage-1) rescaler is stored: never the backbone
    assert all(k.startswith("rescaler.") for k in stored - trainable), sorted(stored - trainable)[:5]
    assert checkpoint["tadm"]["backbone_id"] == m.backbone.backbone_id
    return {"trainable": trainable, "changed": changed, "stored": stored}
