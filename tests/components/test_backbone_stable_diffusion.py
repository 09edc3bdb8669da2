"""StableDiffusionBackbone on tiny random pipelines saved to disk, loaded through from_pretrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
from tadm.components.backbones.stable_diffusion.unet_presets import PRESETS
from tadm.contracts import BACKBONES
from tadm.testing.twins.unet_twins import (
    StableDiffusionTwin,
    build_tiny_components,
    get_twin_preset,
    save_tiny_pipeline,
    save_tiny_vae,
)

# tiny preset -> (full-size preset of the same family, VAE scaling, prediction type in its scheduler)
CASES = {
    "tiny-sd15": ("sd15", 0.18215, "epsilon"),
    "tiny-sd21": ("sd21", 0.18215, "v_prediction"),
    "tiny-sdxl": ("sdxl", 0.13025, "epsilon"),
}
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {name: save_tiny_pipeline(name, root / name) for name in CASES}


def _images(batch: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def _loaded(preset: str, folder: Path, **kwargs: object) -> StableDiffusionBackbone:
    bb = StableDiffusionBackbone(preset=preset, pretrained=str(folder), **kwargs)
    bb.load(["vae"])
    return bb


@pytest.mark.parametrize("tiny", list(CASES))
def test_loads_saved_tiny_pipeline(tiny: str, pipelines: dict[str, Path]) -> None:
    preset, scaling, prediction = CASES[tiny]
    folder = pipelines[tiny]
    bb = StableDiffusionBackbone(preset=preset, pretrained=str(folder))
    assert bb.loaded_parts == frozenset() and bb.vae is None  # construction loads nothing
    assert bb.backbone_id == f"stable_diffusion:{preset}:{folder}"

    bb.load(["vae", "unet", "text"])
    assert bb.loaded_parts == {"vae", "unet", "text"}
    assert (bb.latent_channels, bb.downsample_factor, bb.scaling_factor) == (4, 8, scaling)
    assert bb.vae.config.scaling_factor == scaling  # read from the saved config
    assert bb.prediction_type == prediction and bb.num_train_timesteps == 1000

    # weights are the saved ones, and equal a fresh deterministic build
    saved = load_file(folder / VAE_FILE)
    key = "encoder.conv_in.weight"
    assert torch.equal(bb.vae.state_dict()[key], saved[key])
    fresh = build_tiny_components(tiny, parts=["vae"])["vae"]
    assert torch.equal(fresh.state_dict()[key], saved[key])

    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(bb.alphas_cumprod, ref.float())
    assert "alphas_cumprod" not in bb.state_dict()  # derived from the config, not checkpointed

    # everything is frozen, in eval mode, and stays in eval when the parent trains
    bb.train()
    for name in ("vae", "unet"):
        module = getattr(bb, name)
        assert name in dict(bb.named_children())
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    # the text encoders ran once for the empty prompt and were released
    assert bb.text_encoder is None and bb.text_encoder_2 is None and bb.tokenizer is None

    x = _images()
    with torch.no_grad():
        z = bb.encode(x)
        y = bb.decode(z)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1

    # the parts fit together: the cached empty-prompt context equals the saved encoders' output
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    with torch.no_grad():
        out = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")(ids, output_hidden_states=True)
        ctx, extra = out.last_hidden_state, {}
        if preset == "sdxl":
            enc2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
            tok2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
            ids2 = tok2([""], padding="max_length", max_length=tok2.model_max_length, return_tensors="pt")
            out2 = enc2(ids2.input_ids, output_hidden_states=True)
            ctx = torch.cat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
            extra = {"added_cond_kwargs": {"text_embeds": out2.text_embeds, "time_ids": torch.zeros(1, 6)}}
            torch.testing.assert_close(bb.pooled_prompt_embeds, out2.text_embeds)
        torch.testing.assert_close(bb.prompt_embeds, ctx)
        eps = bb.unet(z[:1], torch.tensor([50.0]), ctx, **extra).sample
    assert eps.shape == (1, 4, 8, 8)

    vae = bb.vae
    bb.load(["vae", "unet", "text"])  # idempotent: nothing is rebuilt
    assert bb.vae is vae


def test_rescaler_stage_loads_only_vae(pipelines: dict[str, Path]) -> None:
    bb = StableDiffusionBackbone(preset="sdxl", pretrained=str(pipelines["tiny-sdxl"]))
    bb.load_for_stage("rescaler")
    assert bb.vae is not None
    assert bb.unet is None and bb.text_encoder is None and bb.text_encoder_2 is None
    assert bb.tokenizer is None and bb.alphas_cumprod is None and bb.prediction_type is None
    assert bb.trainable_parameters("rescaler") == []


def test_fallbacks_before_loading() -> None:
    """The CLI links latent_channels at instantiation, before any weights exist."""
    bb = StableDiffusionBackbone(preset="sdxl")
    assert (bb.latent_channels, bb.downsample_factor, bb.scaling_factor) == (4, 8, 0.13025)
    assert bb.pretrained == PRESETS["sdxl"].hub_id
    assert (
        StableDiffusionBackbone().backbone_id
        == "stable_diffusion:sd21-base:stabilityai/stable-diffusion-2-1-base"
    )
    assert BACKBONES.get("stable_diffusion") is StableDiffusionBackbone
    with pytest.raises(RuntimeError, match="not loaded"):
        bb.encode(_images(1))
    with pytest.raises(ValueError, match="known presets: sd15, sd21, sd21-base, sdxl$"):
        StableDiffusionBackbone(preset="sd3")
    with pytest.raises(ValueError, match="known presets: sd15, sd21, sd21-base, sdxl$"):
        StableDiffusionBackbone(preset="tiny-sd21")  # the twin's preset is the twin's alone
    with pytest.raises(ValueError, match="unknown backbone parts"):
        bb.load(["vea"])


def test_tiny_preset_builds_in_memory_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    bb = StableDiffusionTwin(preset="tiny-sd21")
    bb.load(["vae", "unet", "text"])  # (LoRA added by load_for_stage draws from the seeded global RNG)
    assert torch.equal(torch.get_rng_state(), state)
    assert bb.prediction_type == "v_prediction"
    assert bb.backbone_id.startswith("stable_diffusion:tiny-sd21:random-seed")
    other = StableDiffusionTwin(preset="tiny-sd21")
    other.load(["vae"])
    assert torch.equal(bb.vae.encoder.conv_in.weight, other.vae.encoder.conv_in.weight)
    assert get_twin_preset("tiny-sdxl").family == "sdxl"
    assert isinstance(bb, StableDiffusionBackbone)  # the real backbone, with parts built from small configs


def test_separate_vae_is_used(pipelines: dict[str, Path], tmp_path: Path) -> None:
    vae_dir = save_tiny_vae("tiny-sd15", tmp_path / "vae-ft", seed=12345)
    own = load_file(pipelines["tiny-sd15"] / VAE_FILE)["encoder.conv_in.weight"]
    separate = load_file(vae_dir / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"]
    assert not torch.equal(own, separate)
    bb = _loaded("sd15", pipelines["tiny-sd15"], vae=str(vae_dir))
    assert torch.equal(bb.vae.encoder.conv_in.weight, separate)
    assert bb.backbone_id.endswith(f"+vae={vae_dir}")


def test_missing_file_is_named(pipelines: dict[str, Path], tmp_path: Path) -> None:
    broken = shutil.copytree(pipelines["tiny-sd15"], tmp_path / "broken")
    (broken / VAE_FILE).unlink()
    bb = StableDiffusionBackbone(preset="sd21-base", pretrained=str(broken))
    with pytest.raises(FileNotFoundError) as info:
        bb.load(["vae"])
    msg = str(info.value)
    assert f"'{broken / VAE_FILE}' (or .bin) not found" in msg
    assert "'sd21-base'" in msg and "vae/config.json" in msg and str(broken) in msg

    shutil.rmtree(broken / "scheduler")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        bb.load(["unet"])
    assert bb.unet is None and bb.prediction_type is None  # no half-loaded part is left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionBackbone(preset="sd15", pretrained=str(tmp_path / "nowhere")).load(["vae"])


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_offline_hub_id_error_names_the_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # the libraries read HF_HUB_OFFLINE at import time; patch the module constant too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "tadm-tests/not-a-real-model"
    bb = StableDiffusionBackbone(preset="sd21-base", pretrained=hub_id)
    with pytest.raises(OSError) as info:
        bb.load(["vae"])
    msg = str(info.value)
    assert repr(hub_id) in msg and "subfolder 'vae'" in msg
    assert f"hf download {hub_id}" in msg and "pretrained: /path/to/folder" in msg


def test_encode_checks_size_and_is_deterministic(pipelines: dict[str, Path]) -> None:
    bb = _loaded("sd15", pipelines["tiny-sd15"])
    with pytest.raises(ValueError, match="multiple of the VAE downsampling factor 8"):
        bb.encode(_images(1, size=60))
    x = _images(1)
    with torch.no_grad():
        assert torch.equal(bb.encode(x), bb.encode(x))  # latent mean by default
        bb.sample_latent = True
        assert not torch.equal(bb.encode(x), bb.encode(x))


def test_a_failing_prompt_embedding_keeps_nothing_of_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """load() is all or nothing: the empty prompt is embedded before any part is kept, so an encoder that
    fails leaves no VAE / UNet / text encoder behind (before: the VAE, the UNet and the encoders stayed)."""
    from transformers import CLIPTextModel

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("encoder failed")

    bb = StableDiffusionTwin("tiny-sd21")
    with monkeypatch.context() as m:
        m.setattr(CLIPTextModel, "forward", broken)
        with pytest.raises(RuntimeError, match="encoder failed"):
            bb.load(["vae", "unet", "text"])
    assert bb.loaded_parts == frozenset() and bb.vae is None and bb.unet is None
    assert bb.text_encoder is None and bb.tokenizer is None and bb.prompt_embeds is None
    bb.load(["vae", "unet", "text"])
    assert bb.loaded_parts == {"vae", "unet", "text"} and bb.prompt_embeds is not None
    assert bb.text_encoder is None and bb.tokenizer is None  # embedded once, then dropped


def test_weights_of_another_family_are_refused_naming_the_preset_to_use(
    pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """An SDXL folder under an SD 2.1 preset: caught at load time, not deep inside the UNet's forward."""
    with pytest.raises(ValueError, match=r"family sd21\) does not match .*StableDiffusionXLPipeline.*'sdxl'"):
        StableDiffusionBackbone("sd21", pretrained=str(pipelines["tiny-sdxl"])).load(["vae"])
    bare = tmp_path / "no-index"
    shutil.copytree(pipelines["tiny-sdxl"], bare)
    (bare / "model_index.json").unlink()  # only the UNet itself can tell
    with pytest.raises(ValueError, match="an SDXL UNet .*Use preset 'sdxl' .*configs/backbone/sdxl.yaml"):
        StableDiffusionBackbone("sd21", pretrained=str(bare)).load(["unet"])
    with pytest.raises(
        ValueError, match="names a StableDiffusionPipeline. Use preset 'sd15' or 'sd21' or 'sd21-base'"
    ):
        StableDiffusionBackbone("sdxl", pretrained=str(pipelines["tiny-sd15"])).load(["vae"])
