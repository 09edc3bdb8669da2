"""``tadm import-release``: the authors' released weights as a tadm checkpoint.

Tiny release-layout files (``tests/helpers/release.py``: the release's key names and shapes on the tiny
SD 2.1 twin) are imported; each imported part must compute what the release's formula computes on the
same weights (DFRM both ways with its latent convention, TPM, Refiner, LoRA scales, x0 at t0 = 50 for
v-prediction), the result must go through the ordinary commands, and bad files must fail clearly with
nothing written.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image

from tadm.commands.main import main
from tadm.contracts import quantize_8bit
from tadm.errors import CheckpointError
from tadm.model.checkpoints import read_checkpoint
from tadm.model.loading import load_codec
from tadm.model.release_import import (
    RELEASE_ALIGNER,
    RELEASE_BACKBONE,
    RELEASE_ENHANCER,
    RELEASE_MODEL,
    RELEASE_RESCALER,
    import_release,
)
from tadm.testing.twins.unet_twins import build_tiny_components, save_tiny_pipeline
from tadm.training.schedules import PiecewiseConstantLR
from tests.helpers import CONFIGS, SAMPLES
from tests.helpers.release import (
    SCALING,
    release_dfrm_down,
    release_dfrm_state,
    release_dfrm_up,
    release_refiner,
    release_refiner_state,
    release_tadm_file,
    release_tpm,
    release_tpm_state,
    write_release_files,
)

#: the backbone every import here is checked against: the tiny SD 2.1 twin saved as a diffusers folder (the
#: release's own layout: preset sd21 with the pipeline's VAE), filled in by ``_twin_folders``
TINY: dict[str, Any] = {"preset": "sd21", "vae": None}
#: the tiny SD 2.1 and SDXL twins as diffusers folders, by family
FOLDERS: dict[str, Path] = {}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _twin_folders(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("twins")
    FOLDERS.update(
        {family: save_tiny_pipeline(f"tiny-{family}", root / family) for family in ("sd21", "sdxl")}
    )
    TINY["pretrained"] = str(FOLDERS["sd21"])


@pytest.fixture(scope="module")
def release_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_release_files(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def imported(release_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tadm_x16.safetensors"
    return import_release(*release_files, out, scale=16, **TINY)


@pytest.fixture(scope="module")
def model(imported: Path) -> Any:
    return load_codec(imported).module


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------- the checkpoint
def test_import_is_an_export_with_the_release_preset_as_its_config(imported: Path) -> None:
    state, meta = read_checkpoint(imported)
    assert meta["stage"] == "enhancer" and meta["scale"] == 16
    assert meta["imported_from"]["tadm"]["file"] == "model_sr_x16.pkl"
    model_cfg = yaml.safe_load(meta["config"])["model"]
    assert model_cfg["rescaler"]["init_args"] == RELEASE_RESCALER
    assert model_cfg["aligner"]["init_args"] == RELEASE_ALIGNER
    assert model_cfg["enhancer"]["init_args"] == RELEASE_ENHANCER
    assert model_cfg["aligner_latents"] == "release"
    backbone = model_cfg["backbone"]["init_args"]
    assert backbone["unet_lora_alpha"] == 8 and backbone["vae_lora_alpha"] == 8
    assert (backbone["unet_lora_rank"], backbone["vae_lora_rank"]) == (48, 16)
    # the file's tensors, renamed: the DFRM in fp32 as every export keeps it
    dfrm = release_dfrm_state(16)
    assert torch.equal(state["rescaler.pixel_branch.2.weight"], dfrm["down_module.1.downsample.1.weight"])
    assert torch.equal(state["rescaler.decoder.10.0.bias"], dfrm["final_module.10.conv_in.bias"])
    assert torch.equal(state["aligner.head.10.weight"], release_tpm_state()["time_predict.fuse_mlp.9.weight"])
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith("rescaler."))


def test_dfrm_down_and_up_are_the_releases_with_its_latent_convention(model: Any) -> None:
    """The release's DFRM reads latent / 0.18215 and the UNet gets its output x 0.18215."""
    sd = release_dfrm_state(16)
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = model.backbone.encode(x)
        y_cont = model.rescaler.invertible(model.rescaler.encode_lr(x, z))
        ref = release_dfrm_down(sd, 16, x, z)
        torch.testing.assert_close(y_cont, ref, rtol=1e-5, atol=1e-6)
        y = model.rescaler.downscale(x, z)
        assert torch.equal(y, quantize_8bit(ref, training=False))  # the stored LR: the release's, rounded
        z_hat = model.rescaler.upscale(y)
        torch.testing.assert_close(z_hat, release_dfrm_up(sd, 16, y) * SCALING, rtol=1e-5, atol=1e-7)
    assert ref.std() > 0.01 and z_hat.std() > 1e-4  # the comparison is not between near-zero tensors


def _one_step_reference(model: Any, z_hat: torch.Tensor, tpm_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The release's enhancer: t = TimeMapping(tpm_input); UNet at t; ``make_1step_sched``'s DDPM
    ``step(out, 50, z)`` plus the Refiner. With one inference step the previous timestep is 50 - 1000 < 0,
    so alpha-bar_prev = 1: the step returns the x0 estimate itself (coefficients 1 and 0, variance 0),
    for v-prediction sqrt(abar_50) z - sqrt(1 - abar_50) v on SD 2.1's scaled-linear schedule."""
    t = release_tpm(release_tpm_state(), tpm_input)
    out = model.backbone.predict(z_hat, t)
    abar = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod[50]
    fixed = abar.sqrt() * z_hat - (1 - abar).sqrt() * out
    return fixed + release_refiner(release_refiner_state(), z_hat, out, t), t, out


def test_enhancer_is_the_releases_one_step_at_t0_50_v_prediction(model: Any) -> None:
    assert model.backbone.prediction_type == "v_prediction"
    z_hat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.8
    model.eval()
    with torch.no_grad():
        z0, t = model.enhance(z_hat)
        ref, t_ref, _ = _one_step_reference(model, z_hat, z_hat)  # inference: the TPM reads scaled z_hat
    torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z0, ref, rtol=1e-4, atol=1e-5)
    model.train()  # training: the release's TPM reads the raw latent (src/tadm.py)
    try:
        with torch.no_grad():
            _, t_train = model.enhance(z_hat)
            _, t_raw, _ = _one_step_reference(model, z_hat, z_hat / SCALING)
        torch.testing.assert_close(t_train, t_raw, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(t_train, t)
    finally:
        model.eval()


def test_refiner_is_the_releases(model: Any) -> None:
    g = torch.Generator().manual_seed(2)
    z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([23.5, 180.0])
    with torch.no_grad():
        ours = model.enhancer.refiner(z, out, t)
    ref = release_refiner(release_refiner_state(), z, out, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert (ours < 0).any() and ours.abs().max() > 1e-3


def test_lora_scales_are_peft_default_alpha_over_rank(model: Any) -> None:
    """UNet rank 48 with alpha 8 (scale 1/6), VAE decoder rank 16 with alpha 8 (scale 1/2)."""
    release = release_tadm_file()
    base = build_tiny_components("tiny-sd21", parts=["unet", "vae"])
    g = torch.Generator().manual_seed(3)
    name = next(n for n in release["state_dict_unet"] if n.endswith("attn1.to_q.lora_A.default.weight"))
    path = name.removesuffix(".lora_A.default.weight")
    a, b = (release["state_dict_unet"][f"{path}.lora_{x}.default.weight"] for x in "AB")
    weight = base["unet"].get_submodule(path).weight
    x = torch.randn(3, weight.shape[1], generator=g)
    with torch.no_grad():
        ours = model.backbone.unet.get_submodule(path)(x)
    torch.testing.assert_close(ours, x @ weight.T + (8 / 48) * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-6)

    path = "decoder.up_blocks.0.resnets.0.conv1"
    a, b = (release["state_dict_vae"][f"{path}.lora_{x}.vae_skip.weight"] for x in "AB")
    conv = base["vae"].get_submodule(path)
    x = torch.randn(1, conv.in_channels, 6, 6, generator=g)
    expected = conv(x) + 0.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.vae.get_submodule(path)(x), expected, rtol=1e-5, atol=1e-6)
    conv_in = release["state_dict_unet"]["conv_in.weight"]
    assert torch.equal(model.backbone.unet.conv_in.weight, conv_in)


def test_commands_use_the_imported_checkpoint(imported: Path, tmp_path: Path) -> None:
    photo = np.asarray(Image.open(SAMPLES / "val" / "chelsea.png").convert("RGB"))[::4, ::4][:64, :96]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo).save(src / "cat.png")
    fast = ["--latent-tile", "16", "--latent-overlap", "8", "--vae-tile", "128", "--vae-overlap", "32"]
    fast.append("--no-progress")
    args = ["--ckpt", str(imported), *fast]
    assert main(["downscale", str(src), "--output", str(tmp_path / "lr"), *args]) == 0
    assert main(["upscale", str(tmp_path / "lr"), "--output", str(tmp_path / "hr"), *args]) == 0
    assert Image.open(tmp_path / "hr" / "cat.png").size == (96, 64)
    report = tmp_path / "report"
    assert main(["evaluate", str(src), "--output", str(report), "--no-perceptual", "--no-fid", *args]) == 0
    assert (report / "summary.md").is_file()


# ------------------------------------------------------------------------------------- bad files
def _import(dfrm: Path, tadm: Path, out: Path, **kw: Any) -> Path:
    return import_release(dfrm, tadm, out, **{**TINY, **kw})


def test_a_random_pkl_is_not_a_release_file(release_files: tuple[Path, Path], tmp_path: Path) -> None:
    junk = tmp_path / "model_sr_x16.pkl"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    other = tmp_path / "other.pkl"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, other)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for bad, message in ((junk, "is not the release's"), (plain, "is not the release's")):
        with pytest.raises(CheckpointError, match=message):
            _import(release_files[0], bad, out_dir / "x.safetensors")
    with pytest.raises(CheckpointError, match="is not the release's DFRM"):
        _import(other, release_files[1], out_dir / "x.safetensors")
    assert _leftovers(out_dir) == []


def test_a_missing_key_is_named_in_the_releases_words(tmp_path: Path) -> None:
    dfrm, tadm = write_release_files(tmp_path / "files")
    obj = torch.load(tadm, weights_only=True)
    del obj["state_dict_timemapping"]["noise_esti.3.conv1.weight"]
    torch.save(obj, tadm)
    with pytest.raises(
        CheckpointError, match=r"state_dict_timemapping lacks \['noise_esti\.3\.conv1\.weight'\]"
    ):
        _import(dfrm, tadm, tmp_path / "a.safetensors")
    # a whole LoRA module gone: only the model knows it should be there
    obj = release_tadm_file()
    gone = [k for k in obj["state_dict_unet"] if ".attn2.to_v.lora_" in k]
    for key in gone:
        del obj["state_dict_unet"][key]
    torch.save(obj, tadm)
    with pytest.raises(
        CheckpointError, match=r"lack .*state_dict_unet\[.*attn2\.to_v\.lora_A\.default\.weight"
    ):
        _import(dfrm, tadm, tmp_path / "b.safetensors")
    del obj["state_dict_refiner"]
    torch.save(obj, tadm)
    with pytest.raises(CheckpointError, match=r"top level lacks \['state_dict_refiner'\]"):
        _import(dfrm, tadm, tmp_path / "c.safetensors")
    assert _leftovers(tmp_path) == ["files"]


def test_unknown_keys_and_wrong_shapes_are_named(tmp_path: Path) -> None:
    dfrm, tadm = write_release_files(tmp_path / "files")
    obj = torch.load(tadm, weights_only=True)
    obj["state_dict_refiner"]["extra_head.weight"] = torch.zeros(1)
    torch.save(obj, tadm)
    with pytest.raises(CheckpointError, match=r"state_dict_refiner has unknown \['extra_head\.weight'\]"):
        _import(dfrm, tadm, tmp_path / "a.safetensors")
    obj = release_tadm_file()
    obj["state_dict_timemapping"]["time_predict.fuse_mlp.9.weight"] = torch.zeros(2, 512)  # 2 outputs
    torch.save(obj, tadm)
    with pytest.raises(CheckpointError, match=r"fuse_mlp\.9\.weight'\]\s*\(2, 512\) vs \(1, 512\)"):
        _import(dfrm, tadm, tmp_path / "b.safetensors")
    torch.save(release_tadm_file(), tadm)  # intact files, another backbone: the LoRA shapes tell
    with pytest.raises(CheckpointError, match=r"do not fit the release model: .*state_dict_unet\["):
        _import(dfrm, tadm, tmp_path / "c.safetensors", preset="sdxl", pretrained=str(FOLDERS["sdxl"]))
    assert _leftovers(tmp_path) == ["files"]


def test_a_x32_dfrm_given_as_x16_names_both(tmp_path: Path) -> None:
    dfrm32, tadm = write_release_files(tmp_path / "files", scale=32)
    with pytest.raises(CheckpointError, match=r"x32 DFRM.*--scale 16"):
        _import(dfrm32, tadm, tmp_path / "a.safetensors", scale=16)
    assert _leftovers(tmp_path) == ["files"]
    # without --scale the file's own scale is used
    out = _import(dfrm32, tadm, tmp_path / "b.safetensors")
    assert read_checkpoint(out)[1]["scale"] == 32


def test_a_file_that_needs_code_to_unpickle_is_refused(
    release_files: tuple[Path, Path], tmp_path: Path
) -> None:
    obj = torch.load(release_files[1], weights_only=True)
    obj["args"] = argparse.Namespace(lr=1e-4)  # any non-plain object: unpickling it would run code
    evil = tmp_path / "model_sr_x16.pkl"
    torch.save(obj, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*Namespace"):
        _import(release_files[0], evil, tmp_path / "a.safetensors")
    assert _leftovers(tmp_path) == ["model_sr_x16.pkl"]


def test_the_command_exits_2_and_writes_nothing(
    release_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dfrm32, _ = write_release_files(tmp_path / "x32", scale=32)
    out = tmp_path / "out.safetensors"
    argv = ["import-release", "--dfrm", str(dfrm32), "--tadm", str(release_files[1]), "--output", str(out)]
    twin = ["--backbone-preset", "sd21", "--backbone-pretrained", TINY["pretrained"], "--vae", "none"]
    assert main([*argv, "--scale", "16", *twin]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tadm import-release: error:") and "x32" in err and "x16" in err
    assert not out.exists()
    dfrm16 = release_files[0]
    argv[2] = str(dfrm16)
    assert main([*argv, *twin]) == 0
    assert out.is_file() and main([*argv, *twin]) == 2  # exists: no --overwrite


# ------------------------------------------------------------------------- the recipes and schedule
def test_release_recipes_set_every_release_option() -> None:
    """configs/experiments/release/ and the importer's preset are the same values (stage 1: the DFRM
    reads scaled latents, as the release trains it)."""
    files = sorted((CONFIGS / "experiments" / "release").glob("*.yaml"))
    assert {f.stem for f in files} == {"rescaler_x16", "enhancer_x16", "joint_x16"}
    for f in files:
        model_cfg = yaml.safe_load(f.read_text())["model"]
        stage = model_cfg["stage"]
        backbone = model_cfg["backbone"]["init_args"]
        rescaler = {**RELEASE_RESCALER, "unscaled_latents": stage != "rescaler"}
        assert {k: model_cfg["rescaler"]["init_args"][k] for k in rescaler} == rescaler, f.name
        if stage == "rescaler":
            assert (backbone["preset"], backbone["vae"]) == ("sd21", RELEASE_BACKBONE["vae"])
            continue
        assert {k: backbone[k] for k in RELEASE_BACKBONE} == RELEASE_BACKBONE, f.name
        assert model_cfg["aligner"]["init_args"] == RELEASE_ALIGNER, f.name
        assert model_cfg["enhancer"]["init_args"] == RELEASE_ENHANCER, f.name
        assert {k: model_cfg[k] for k in RELEASE_MODEL} == RELEASE_MODEL, f.name


def test_piecewise_constant_lr_is_the_releases_history() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = PiecewiseConstantLR(opt, boundaries=[3], multipliers=[0.5])
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-5, 5e-5, 5e-5, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="one multiplier per boundary"):
        PiecewiseConstantLR(opt, boundaries=[3, 5], multipliers=[0.5])
