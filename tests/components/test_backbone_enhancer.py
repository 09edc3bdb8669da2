"""The backbone's enhancer side: empty-prompt conditioning, one UNet call, LoRA trainable parts."""

from __future__ import annotations

import pytest
import torch

from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
from tadm.testing.twins.unet_twins import StableDiffusionTwin

FAMILIES = ["tiny-sd15", "tiny-sd21", "tiny-sdxl"]


@pytest.fixture(scope="module")
def enhancer_backbones() -> dict[str, StableDiffusionBackbone]:
    out = {}
    for preset in FAMILIES:
        b = StableDiffusionTwin(preset=preset)
        b.load_for_stage("enhancer")
        out[preset] = b
    return out


@pytest.mark.parametrize("preset", FAMILIES)
def test_empty_prompt_cached_and_text_encoders_released(preset: str, enhancer_backbones) -> None:
    b = enhancer_backbones[preset]
    assert b.text_encoder is None and b.text_encoder_2 is None and b.tokenizer is None
    assert "text" in b.loaded_parts
    ctx = b.unet.config.cross_attention_dim
    assert b.prompt_embeds.shape == (1, 77, ctx)
    if preset == "tiny-sdxl":
        assert b.pooled_prompt_embeds is not None and b.pooled_prompt_embeds.shape[0] == 1
    else:
        assert b.pooled_prompt_embeds is None


@pytest.mark.parametrize("preset", FAMILIES)
def test_predict_shape_and_lora_starts_as_identity(preset: str, enhancer_backbones) -> None:
    """Gaussian-initialised LoRA has B = 0, so the adapted UNet equals the base UNet at start."""
    b = enhancer_backbones[preset]
    base = StableDiffusionTwin(preset=preset)
    base.load(["vae", "unet", "text"])  # same seeded weights, no LoRA
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([20.0, 150.0])
    with torch.no_grad():
        out = b.predict(z, t)
        ref = base.predict(z, t)
    assert out.shape == z.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b.predict(z, torch.tensor([999.0, 999.0])), out)  # t really used


def test_trainable_parts_are_lora_conv_in_and_decoder_only(enhancer_backbones) -> None:
    b = enhancer_backbones["tiny-sd21"]
    trainable = {id(p) for p in b.trainable_parameters("enhancer")}
    names = [n for n, p in b.named_parameters() if id(p) in trainable]
    assert names and all("lora_" in n or n.startswith("unet.conv_in.") for n in names)
    assert any(n.startswith("unet.conv_in.") for n in names)
    assert any(n.startswith("vae.decoder.") for n in names)
    assert not any(n.startswith("vae.encoder.") or n.startswith("vae.quant_conv") for n in names)
    lora_targets = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_A." in n and n.startswith("unet.")
    }
    assert {"to_q", "to_k", "to_v", "0", "conv1", "conv2", "proj_in", "proj_out", "conv_out"} <= lora_targets
    assert b.trainable_parameters("rescaler") == []


def test_sdxl_vae_stays_fp32_under_autocast(enhancer_backbones) -> None:
    b = enhancer_backbones["tiny-sdxl"]
    z = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = b.decode(z)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    with torch.no_grad():
        torch.testing.assert_close(x, b.decode(z))


def test_lora_alpha_sets_the_peft_scale(enhancer_backbones) -> None:
    """Default alpha = rank (scale 1); the release's peft default alpha 8 at ranks 48 / 16: 1/6 and 1/2."""
    from tadm.components.backbones.stable_diffusion import UNET_ADAPTER, VAE_ADAPTER

    def scales(b: StableDiffusionBackbone) -> tuple[float, float]:
        unet = b.unet.get_submodule("down_blocks.1.attentions.0.proj_in").scaling[UNET_ADAPTER]
        vae = b.vae.get_submodule("decoder.conv_in").scaling[VAE_ADAPTER]
        return unet, vae

    assert scales(enhancer_backbones["tiny-sd21"]) == (1.0, 1.0)
    release = StableDiffusionTwin(
        preset="tiny-sd21", unet_lora_rank=48, vae_lora_rank=16, unet_lora_alpha=8, vae_lora_alpha=8
    )
    release.load_for_stage("enhancer")
    assert scales(release) == pytest.approx((8 / 48, 8 / 16))
