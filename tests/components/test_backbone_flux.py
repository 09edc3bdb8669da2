"""The FLUX.1 backbone on its tiny twin: packing, guidance, the one step against diffusers' pipeline, every
stage's trained set, the prompt-embedding file, tiles, and the codec from a CLI-trained checkpoint,
including checkpoints and folders of another family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from tadm.commands.main import main
from tadm.components.backbones.flow_transformers import FluxBackbone
from tadm.errors import CheckpointError
from tadm.inference.tiling import Tiling, enhancer_tiles
from tadm.model.loading import load_codec
from tadm.testing.twins import twin_args
from tests.helpers import CONFIGS
from tests.helpers.cli import build_cli, data_args, one_cpu_quiet_args
from tests.helpers.dit import (
    BACKBONE_YAML,
    check_round_trips,
    check_trained_set,
    photo,
    pipeline_one_step,
    save_pipeline,
    tiny_backbone,
    tiny_module,
)


def test_presets_report_latent_and_text_length_before_any_weights() -> None:
    dev, schnell = FluxBackbone("flux1-dev"), FluxBackbone("flux1-schnell")
    assert (dev.latent_channels, dev.scaling_factor, dev.shift_factor, dev.latent_multiple) == (
        16,
        0.3611,
        0.1159,
        2,
    )
    assert (dev.max_sequence_length, schnell.max_sequence_length, dev.guidance) == (512, 256, 3.5)
    assert dev.backbone_id == "flux:flux1-dev:black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match="sd3 preset, not flux"):
        FluxBackbone("sd35-medium")


@pytest.mark.parametrize("sigma", [0.1, 0.6])
def test_one_step_equals_the_diffusers_pipeline(sigma: float) -> None:
    """CLIP-L pooled + T5 of "", 2x2 packing, image / text ids, guidance 3.5, t / 1000 into the transformer at
    FLUX's resolution-shifted sigma, x0 = z - sigma v: FluxPipeline's one Euler step to 0, number for number."""
    bb = tiny_backbone("flux")
    bb.load(["unet", "text"])
    z = torch.randn(2, 16, 8, 10, generator=torch.Generator().manual_seed(2))
    expected, t = pipeline_one_step("flux", z, sigma)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (4 * 5 - 256)  # 20 packed tokens
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / sigma - 1)
    assert t[0].item() == pytest.approx(1000 * shifted.item(), rel=1e-5)
    with torch.no_grad():
        got = bb.time_convention.x0(z, bb.predict(z, t), t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packing_round_trips_and_guidance_reaches_the_transformer() -> None:
    z = torch.randn(2, 16, 6, 10)
    packed = FluxPipeline._pack_latents(z, 2, 16, 6, 10)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6, 10, 1), z)  # the call predict makes
    bb = tiny_backbone("flux")
    bb.load(["unet", "text"])
    t = torch.tensor([150.0, 150.0])
    with torch.no_grad():
        default = bb.predict(z, t)
        bb.guidance = 1.0
        other = bb.predict(z, t)
        odd = bb.predict(z[..., :5, :9], t)
        padded = bb.predict(torch.nn.functional.pad(z[..., :5, :9], (0, 1, 0, 1), mode="replicate"), t)
    assert bb.transformer.config.guidance_embeds and (default - other).abs().max() > 1e-4
    torch.testing.assert_close(odd, padded[..., :5, :9])


@pytest.mark.parametrize(
    ("stage", "scale"), [("rescaler", 16), ("enhancer", 16), ("joint", 16), ("joint", 32)]
)
def test_each_stage_trains_exactly_lora_tpm_and_refiner(stage: str, scale: int) -> None:
    done = check_trained_set("flux", stage, scale)
    if stage != "rescaler":
        adapted = {
            n.split(".lora_")[0].split("transformer.")[-1] for n in done["trainable"] if ".transformer." in n
        }
        for target in ("attn.to_q", "attn.add_v_proj", "attn.to_add_out", "ff_context.net.2", "proj_mlp"):
            assert any(n.endswith(target) for n in adapted), target
        assert "x_embedder" in adapted and any(n.startswith("single_transformer_blocks.") for n in adapted)


def test_prompt_embedding_file_round_trips_bit_exactly(tmp_path: Path) -> None:
    bb = tiny_backbone("flux")
    path = bb.save_prompt_embedding(tmp_path / "flux.safetensors")
    stored = load_file(str(path))
    assert stored["prompt_embeds"].shape == (1, 8, 64) and stored["pooled_prompt_embeds"].shape == (1, 32)
    reader = tiny_backbone("flux", prompt_embedding=str(path))
    reader.load(["text"])
    assert torch.equal(reader.prompt_embeds, bb.prompt_embeds)
    assert torch.equal(reader.pooled_prompt_embeds, bb.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="written for flux preset 'tiny-flux'"):
        tiny_backbone("sd3", prompt_embedding=str(path)).load(["text"])


def test_enhancer_tiles_follow_the_patch_size(one_thread: None) -> None:
    assert enhancer_tiles(Tiling(latent_tile=15, latent_overlap=6), 2) == (14, 6)
    assert enhancer_tiles(Tiling(latent_tile=15, latent_overlap=6), 1) == (15, 6)  # the UNets: unchanged
    assert enhancer_tiles(Tiling(latent_tile=3, latent_overlap=2), 2) == (2, 0)
    # RoPE positions are relative and tiles are patch-aligned: tiles agree closely with the whole image
    check_round_trips("flux", min_agreement_db=30.0)


@pytest.fixture(scope="module")
def flux_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage-2 step of configs/experiments/enhancer_x16.yaml with configs/backbone/flux1-dev.yaml, shrunk
    to the tiny twin: no other change to either config."""
    root = tmp_path_factory.mktemp("flux-stage2")
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "experiments" / "enhancer_x16.yaml"),
            "--config",
            str(BACKBONE_YAML["flux"]),
            *twin_args("tiny-flux"),
            "--model.init_from=null",
            "--model.loss_weights={pixel: 1.0}",
            "--trainer.precision=32-true",
            "--trainer.max_steps=1",
            "--trainer.accumulate_grad_batches=1",
            *one_cpu_quiet_args(),
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            *data_args(crop=64, batch=1),
            "--data.init_args.num_workers=0",
        ]
    )
    assert cli.model.aligner.latent_channels == 16 and cli.model.enhancer.latent_channels == 16
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = root / "last.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


@pytest.mark.slow
def test_cli_checkpoint_exports_and_runs_the_codec(
    flux_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    small = tmp_path / "flux.safetensors"
    assert main(["export", str(flux_ckpt), "--output", str(small)]) == 0
    assert "MB" in capsys.readouterr().out
    stored = load_file(str(small))
    backbone = {k for k in stored if k.startswith("backbone.")}
    assert backbone and all(
        ".lora_" in k for k in backbone
    )  # only trained tensors: LoRA, never the transformer
    photos = tmp_path / "photos"
    photos.mkdir()
    from torchvision.utils import save_image

    save_image((photo((72, 88)) + 1) / 2, photos / "astronaut.png")
    fast = [
        "--latent-tile",
        "16",
        "--latent-overlap",
        "8",
        "--vae-tile",
        "128",
        "--vae-overlap",
        "32",
        "--no-progress",
    ]
    assert (
        main(["downscale", "--ckpt", str(small), str(photos), "--output", str(tmp_path / "lr"), *fast]) == 0
    )
    assert (
        main(["upscale", "--ckpt", str(small), str(tmp_path / "lr"), "--output", str(tmp_path / "hr"), *fast])
        == 0
    )
    from PIL import Image

    assert Image.open(tmp_path / "hr" / "astronaut.png").size == (88, 72)


def test_a_checkpoint_of_another_family_is_refused_naming_both(tmp_path: Path) -> None:
    """A FLUX checkpoint as init_from of an SD 3 model (and the reverse)."""
    paths = {}
    for family in ("flux", "sd3"):
        m = tiny_module(family, "enhancer")
        checkpoint = {"state_dict": m.state_dict()}
        m.on_save_checkpoint(checkpoint)
        paths[family] = tmp_path / f"{family}.ckpt"
        torch.save(checkpoint, paths[family])
    ids = {"flux": "'flux:tiny-flux:random-seed1100'", "sd3": "'sd3:tiny-sd3:random-seed3500'"}
    for family, other in (("sd3", "flux"), ("flux", "sd3")):
        with pytest.raises(CheckpointError) as info:
            tiny_module(family, "enhancer").model.load_weights(str(paths[other]))
        msg = str(info.value)
        assert ids[other] in msg and ids[family] in msg and "use the same backbone config" in msg


@pytest.mark.slow
def test_a_cli_checkpoint_run_on_a_folder_of_another_family_is_refused(
    flux_ckpt: Path, tmp_path: Path
) -> None:
    """A checkpoint of the real FLUX backbone (its stored config names ``flux`` / flux1-dev: the twin the
    fixture trained takes no folder) run with ``--backbone`` an SD 3 folder: refused naming both families."""
    import yaml

    ckpt = torch.load(flux_ckpt, weights_only=True)
    config = yaml.safe_load(ckpt["tadm"]["config"])
    config["model"]["backbone"] = {"class_path": "flux", "init_args": {"preset": "flux1-dev"}}
    ckpt["tadm"]["config"] = yaml.safe_dump(config)
    real = tmp_path / "real_flux.ckpt"
    torch.save(ckpt, real)
    sd3_folder = save_pipeline("sd3", tmp_path / "sd3")
    with pytest.raises(CheckpointError) as info:
        load_codec(real, backbone_pretrained=str(sd3_folder))
    msg = str(info.value)
    assert "family flux" in msg and "StableDiffusion3Pipeline (family sd3)" in msg
