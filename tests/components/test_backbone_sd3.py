"""The SD 3.x backbone on its tiny twin: loading, the one step against diffusers' pipeline, every stage's
trained set, the prompt-embedding file, tiled and whole round trips, the codec."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tadm.commands.main import main
from tadm.components.backbones.flow_transformers import SD3Backbone
from tadm.components.backbones.flow_transformers.prompt_embedding_file import write_prompt_embedding
from tadm.errors import ConfigError
from tadm.testing.twins import flow_twins, write_twin_config
from tests.helpers.dit import (
    BACKBONE_YAML,
    check_round_trips,
    check_trained_set,
    photo,
    pipeline_one_step,
    save_pipeline,
    tiny_backbone,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD 3 and FLUX pipelines saved as diffusers folders (a real download's layout)."""
    root = tmp_path_factory.mktemp("dit")
    return {family: save_pipeline(family, root / family) for family in ("sd3", "flux")}


def test_full_size_preset_reports_its_latent_before_any_weights() -> None:
    bb = SD3Backbone("sd35-medium")
    assert (bb.latent_channels, bb.downsample_factor, bb.latent_multiple) == (16, 8, 2)
    assert (bb.scaling_factor, bb.shift_factor) == (1.5305, 0.0609)
    assert bb.backbone_id == "sd3:sd35-medium:stabilityai/stable-diffusion-3.5-medium"
    assert not bb.has_diffusion and bb.time_convention is None and bb.max_sequence_length == 256
    with pytest.raises(ValueError, match="flux preset, not sd3"):
        SD3Backbone("flux1-dev")
    with pytest.raises(ValueError, match="known presets: sd35-medium, sd35-large$"):
        SD3Backbone("sd3-turbo")
    with pytest.raises(ValueError, match="known presets: sd35-medium, sd35-large$"):
        SD3Backbone("tiny-sd3")  # the twin's preset is the twin's alone


def test_stage1_loads_only_the_vae_and_latents_carry_scaling_and_shift() -> None:
    bb = tiny_backbone("sd3")
    bb.load_for_stage("rescaler")
    assert bb.loaded_parts == {"vae"} and bb.transformer is None and bb.prompt_embeds is None
    x = photo((64, 80)) * 0.9
    z = bb.encode(x)
    with torch.no_grad():
        raw = bb.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5305)
    with torch.no_grad():
        torch.testing.assert_close(bb.decode(z), bb.vae.decode(z / 1.5305 + 0.0609).sample.clamp(-1, 1))
    with pytest.raises(RuntimeError, match="part 'unet' is not loaded"):
        bb.predict(z, torch.tensor([100.0]))


@pytest.mark.parametrize("sigma", [0.1, 0.6])
def test_one_step_equals_the_diffusers_pipeline(sigma: float) -> None:
    """Empty prompt through CLIP-L/G + T5, the transformer at t = sigma * 1000 (after SD 3's shift of 3), and
    x0 = z - sigma v: the same numbers as StableDiffusion3Pipeline's one Euler step to sigma 0."""
    bb = tiny_backbone("sd3")
    bb.load(["unet", "text"])
    assert not any("text_encoder" in name for name, _ in bb.named_modules())  # embedded once, never kept
    z = torch.randn(2, 16, 8, 10, generator=torch.Generator().manual_seed(1))
    expected, t = pipeline_one_step("sd3", z, sigma)
    assert t[0].item() == pytest.approx(1000 * 3 * sigma / (1 + 2 * sigma), rel=1e-5)
    with torch.no_grad():
        got = bb.time_convention.x0(z, bb.predict(z, t), t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_predict_pads_odd_latents_to_the_patch_size() -> None:
    bb = tiny_backbone("sd3")
    bb.load(["unet", "text"])
    z, t = torch.randn(1, 16, 7, 9), torch.tensor([120.0])
    with torch.no_grad():
        out = bb.predict(z, t)
        padded = bb.predict(torch.nn.functional.pad(z, (0, 1, 0, 1), mode="replicate"), t)
    assert out.shape == z.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, padded[..., :7, :9])


@pytest.mark.parametrize(
    ("stage", "scale"), [("rescaler", 16), ("enhancer", 16), ("joint", 16), ("joint", 32)]
)
def test_each_stage_trains_exactly_lora_tpm_and_refiner(stage: str, scale: int) -> None:
    """x16 and x32: the DFRM at 16 latent channels (factor 2 and 4 from the latent to the LR image)."""
    done = check_trained_set("sd3", stage, scale)
    if stage != "rescaler":
        adapted = {
            n.split(".lora_")[0].split("transformer.")[-1] for n in done["trainable"] if ".transformer." in n
        }
        for target in (
            "attn.to_q",
            "attn.add_k_proj",
            "attn.to_add_out",
            "attn2.to_v",
            "ff.net.2",
            "ff_context.net.0.proj",
        ):
            assert any(n.endswith(target) for n in adapted), target  # SD 3.5's second attention (attn2) too
        assert "pos_embed.proj" in adapted and "proj_out" in adapted


def test_loads_a_saved_diffusers_folder_like_the_in_memory_twin(folders: dict[str, Path]) -> None:
    bb = SD3Backbone("sd35-medium", pretrained=str(folders["sd3"]), max_sequence_length=8)
    bb.load(["vae", "unet", "text"])
    twin = tiny_backbone("sd3")
    twin.load(["vae", "unet", "text"])
    for a, b in ((bb.transformer, twin.transformer), (bb.vae, twin.vae)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    assert torch.equal(bb.prompt_embeds, twin.prompt_embeds) and bb.time_convention.shift == 3.0
    assert bb.backbone_id == f"sd3:sd35-medium:{folders['sd3']}"


def test_missing_files_and_offline_hub_ids_are_named(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = shutil.copytree(folders["sd3"], tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    bb = SD3Backbone("sd35-medium", pretrained=str(broken))
    with pytest.raises(FileNotFoundError, match="transformer/diffusion_pytorch_model.safetensors'"):
        bb.load(["unet"])
    assert bb.transformer is None and not bb.has_diffusion  # nothing half-loaded
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match="tokenizer_3/tokenizer.json"):
        bb.load(["text"])
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        SD3Backbone("sd35-medium").load(["vae"])
    msg = str(info.value)
    assert (
        "'stabilityai/stable-diffusion-3.5-medium'" in msg
        and "hf download stabilityai/stable-diffusion-3.5-medium" in msg
    )


def test_a_folder_of_another_family_is_refused_naming_both(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        SD3Backbone("sd35-medium", pretrained=str(folders["flux"])).load(["vae"])
    msg = str(info.value)
    assert "family sd3" in msg and "FluxPipeline (family flux)" in msg and "flux1-dev" in msg
    # a transformer of the other family under a folder without model_index.json: refused before loading
    mixed = shutil.copytree(folders["sd3"], tmp_path / "mixed")
    (mixed / "model_index.json").unlink()
    shutil.rmtree(mixed / "transformer")
    shutil.copytree(folders["flux"] / "transformer", mixed / "transformer")
    with pytest.raises(ValueError, match="holds a FluxTransformer2DModel .*family flux"):
        SD3Backbone("sd35-medium", pretrained=str(mixed)).load(["unet"])


@pytest.mark.parametrize(("family", "pipeline", "preset"), [("sd3", "StableDiffusion3Pipeline", "sd35-medium"),
    ("flux", "FluxPipeline", "flux1-dev")])  # fmt: skip
def test_the_unet_backbone_refuses_a_dit_folder_naming_the_backbone_to_use(
    folders: dict[str, Path], family: str, pipeline: str, preset: str
) -> None:
    """Refused before any loading. Before, the VAE alone loaded silently (SD 3's 16-channel VAE into an SD 2.1
    backbone) and the UNet failed on a missing unet/ folder without naming the family."""
    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone

    for part in ("vae", "unet"):
        with pytest.raises(ValueError) as info:
            StableDiffusionBackbone("sd21-base", pretrained=str(folders[family])).load([part])
        msg = str(info.value)
        assert "family sd21" in msg and f"names a {pipeline} (family {family})" in msg, msg
        assert f"Use the {family} backbone with preset '{preset}'" in msg, msg


def test_prompt_embedding_file_round_trips_bit_exactly_and_replaces_the_encoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bb = tiny_backbone("sd3")
    path = bb.save_prompt_embedding(tmp_path / "empty.safetensors")
    stored = load_file(str(path))
    assert torch.equal(stored["prompt_embeds"], bb.prompt_embeds) and stored["prompt_embeds"].shape == (
        1,
        77 + 8,
        64,
    )
    assert torch.equal(stored["pooled_prompt_embeds"], bb.pooled_prompt_embeds)
    assert bb.transformer is None and bb.vae is None  # only the text encoders were loaded, then freed

    built: list[set[str]] = []
    real = flow_twins.build_tiny_dit_components
    monkeypatch.setattr(
        "tadm.testing.twins.flow_twins.build_tiny_dit_components",
        lambda preset, parts=None, seed=None: built.append(set(parts)) or real(preset, parts, seed),
    )
    reader = tiny_backbone("sd3", prompt_embedding=str(path))
    reader.load_for_stage("enhancer")
    assert built == [{"vae", "unet"}]  # no text encoder built
    assert torch.equal(reader.prompt_embeds, bb.prompt_embeds) and reader.has_diffusion
    # written for another preset / length, or of other widths than the transformer's: refused, naming it
    with pytest.raises(ConfigError, match="written for sd3 preset 'tiny-sd3'"):
        SD3Backbone("sd35-medium", prompt_embedding=str(path)).load(["text"])
    with pytest.raises(ConfigError, match="holds 8 T5 tokens"):
        tiny_backbone("sd3", prompt_embedding=str(path), max_sequence_length=16).load(["text"])
    meta = {k: "x" for k in ("source", "backbone_id", "prompt", "text_encoders")}
    meta.update(family="sd3", preset="tiny-sd3", max_sequence_length="8", text_encoders="{}")
    narrow = write_prompt_embedding(
        tmp_path / "narrow.safetensors",
        {"prompt_embeds": torch.zeros(1, 85, 32), "pooled_prompt_embeds": torch.zeros(1, 64)},
        meta,
    )
    with pytest.raises(
        ConfigError, match=r"widths \(sequence 32, pooled 64\) but the transformer takes \(64, 64\)"
    ):
        tiny_backbone("sd3", prompt_embedding=str(narrow)).load(["unet", "text"])
    with pytest.raises(ConfigError, match="not found; write it with `tadm embed-prompt"):
        tiny_backbone("sd3", prompt_embedding=str(tmp_path / "none.safetensors")).load(["text"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        tiny_backbone("sd3", prompt_embedding=str(tmp_path / "junk.safetensors")).load(["text"])


def test_embed_prompt_command_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sd3.safetensors"
    twin_yaml = write_twin_config("tiny-sd3", tmp_path / "twin.yaml")
    args = ["embed-prompt", "--backbone", str(BACKBONE_YAML["sd3"]), str(twin_yaml)]
    assert main([*args, "--output", str(out)]) == 0
    assert "prompt_embeds (1, 85, 64)" in capsys.readouterr().out
    twin = tiny_backbone("sd3")
    twin.load(["text"])
    assert torch.equal(load_file(str(out))["prompt_embeds"], twin.prompt_embeds)
    assert main([*args, "--output", str(out)]) == 2  # exists
    assert "pass --overwrite" in capsys.readouterr().err
    sd = str(Path(BACKBONE_YAML["sd3"]).parent / "sd21-base.yaml")
    assert (
        main(
            [
                "embed-prompt",
                "--backbone",
                sd,
                str(write_twin_config("tiny-sd21", tmp_path / "sd_twin.yaml")),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not read its prompt embedding from a file" in capsys.readouterr().err


def test_round_trip_whole_and_tiled(one_thread: None) -> None:
    """SD 3's absolute position embeddings are cropped from the centre of its table for every input size, so a
    tile sees other positions than its region in the whole image: tiles agree less than FLUX's (RoPE)."""
    check_round_trips("sd3", min_agreement_db=18.0)


def test_dtype_bfloat16_keeps_the_vae_in_float32() -> None:
    bb = tiny_backbone("sd3", dtype="bfloat16")
    bb.load(["vae", "unet", "text"])
    assert bb.transformer.dtype == torch.bfloat16 and bb.vae.dtype == torch.float32
    ref = tiny_backbone("sd3")
    ref.load(["unet", "text"])
    z, t = torch.randn(1, 16, 8, 8), torch.tensor([200.0])
    with torch.no_grad():
        low, full = bb.predict(z, t), ref.predict(z, t)
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.1 * full.abs().max()
