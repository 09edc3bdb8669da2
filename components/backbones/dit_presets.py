"""Named rectified-flow transformer variants (SD 3.x, FLUX.1) and their full-size architectures.

Like :mod:`tadm.components.backbones.presets` for the UNet families: a :class:`DiTPreset` records
what is known about a variant *without loading it* (family, hub id, the 16-channel latent with its
scaling AND shift factor, the text length of the empty prompt), so a CLI can link ``latent_channels``
before any weights exist. ``tiny-*`` presets are random look-alikes for tests, built in
:mod:`tadm.components.backbones.dit_tiny`; ``FULL_SIZE_*`` are the real architectures' configs (no
weights), for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DiTFamily = Literal["sd3", "flux"]

#: the diffusers pipeline class a folder of each family names in its model_index.json
PIPELINE_CLASSES: dict[str, str] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
#: (text encoder, tokenizer) subfolders per family, in the pipelines' order
TEXT_SUBFOLDERS: dict[str, tuple[tuple[str, str], ...]] = {
    # CLIP-L and CLIP-G (both CLIPTextModelWithProjection), T5-XXL
    "sd3": (
        ("text_encoder", "tokenizer"),
        ("text_encoder_2", "tokenizer_2"),
        ("text_encoder_3", "tokenizer_3"),
    ),
    # CLIP-L (CLIPTextModel, pooled output only), T5-XXL
    "flux": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}


@dataclass(frozen=True)
class DiTPreset:
    """What is known about a DiT variant before loading it.

    ``latent_channels``, ``downsample_factor``, ``scaling_factor`` and ``shift_factor`` are the
    fallbacks until the VAE is loaded (then its config wins). ``max_sequence_length`` is the T5
    length of the empty prompt, the pipelines' default for the variant.
    """

    name: str
    family: DiTFamily
    hub_id: str | None
    tiny: bool = False
    description: str = ""
    #: native training resolution in pixels (FLUX's dynamic time shift is read there)
    resolution: int = 1024
    latent_channels: int = 16
    downsample_factor: int = 8
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    #: T5 tokens of the empty-prompt embedding (SD 3 pipeline: 256; FLUX.1-dev: 512, schnell: 256)
    max_sequence_length: int = 256
    #: tiny presets only: whether the tiny FLUX transformer has a guidance embedding (FLUX.1-dev does)
    tiny_guidance_embeds: bool = False
    #: tiny presets only: base seed of the random weights (each module gets its own offset)
    seed: int = 0


DIT_PRESETS: dict[str, DiTPreset] = {
    p.name: p
    for p in (
        DiTPreset(
            "sd35-medium",
            "sd3",
            "stabilityai/stable-diffusion-3.5-medium",
            description="SD 3.5 Medium: MMDiT-X, 2.5 B, CLIP-L + CLIP-G + T5-XXL, time shift 3",
        ),
        DiTPreset(
            "sd35-large",
            "sd3",
            "stabilityai/stable-diffusion-3.5-large",
            description="SD 3.5 Large: MMDiT, 8.1 B, CLIP-L + CLIP-G + T5-XXL, time shift 3",
        ),
        DiTPreset(
            "flux1-dev",
            "flux",
            "black-forest-labs/FLUX.1-dev",
            description="FLUX.1 [dev]: 12 B, guidance-distilled (guidance embedding), CLIP-L + T5-XXL",
            scaling_factor=0.3611,
            shift_factor=0.1159,
            max_sequence_length=512,
        ),
        DiTPreset(
            "flux1-schnell",
            "flux",
            "black-forest-labs/FLUX.1-schnell",
            description="FLUX.1 [schnell]: 12 B, timestep-distilled (no guidance embedding), CLIP-L + T5-XXL",
            scaling_factor=0.3611,
            shift_factor=0.1159,
            max_sequence_length=256,
        ),
        DiTPreset(
            "tiny-sd3",
            "sd3",
            None,
            tiny=True,
            description="random tiny SD 3.5 look-alike for tests (MMDiT-X dual attention, three text encoders)",
            resolution=64,
            max_sequence_length=8,
            seed=3500,
        ),
        DiTPreset(
            "tiny-flux",
            "flux",
            None,
            tiny=True,
            description="random tiny FLUX.1-dev look-alike for tests (packed 2x2 latents, guidance embedding)",
            resolution=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            max_sequence_length=8,
            tiny_guidance_embeds=True,
            seed=1100,
        ),
    )
}


def get_dit_preset(name: str | DiTPreset, family: str | None = None) -> DiTPreset:
    """Look a preset up by name (and check its family), with the known names in the error."""
    preset = name if isinstance(name, DiTPreset) else DIT_PRESETS.get(name)
    fits = [n for n, p in DIT_PRESETS.items() if family is None or p.family == family]
    if preset is None:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {', '.join(fits)}")
    if family is not None and preset.family != family:
        raise ValueError(
            f"backbone preset {preset.name!r} is a {preset.family} preset, not {family}; "
            f"use one of {', '.join(fits)} (or the {preset.family} backbone)"
        )
    return preset


#: diffusers configs of the real full-size architectures (no weights), for benchmarks
FULL_SIZE_DIT_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
FULL_SIZE_TRANSFORMERS: dict[str, dict] = {
    "sd35-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "sd35-large": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm",
    ),
    "flux1-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip


def family_of_class(name: str) -> str | None:
    """The tadm family a diffusers pipeline / transformer class name belongs to (None: unknown)."""
    if "StableDiffusion3" in name or name.startswith("SD3"):
        return "sd3"
    if "Flux" in name:
        return "flux"
    if "StableDiffusionXL" in name:
        return "sdxl"
    if "StableDiffusion" in name or name.startswith("UNet2D"):
        return "stable_diffusion"
    return None


def family_hint(family: str | None) -> str:
    """Which presets (and backbone configs) fit weights of ``family``."""
    if family in ("sd3", "flux"):
        names = [p.name for p in DIT_PRESETS.values() if p.family == family and not p.tiny]
        configs = ", ".join(f"configs/backbone/{n}.yaml" for n in names)
        return f"Use the {family} backbone with preset {' or '.join(repr(n) for n in names)} ({configs})."
    if family in ("sdxl", "stable_diffusion"):
        return "Use the stable_diffusion backbone (configs/backbone/sd21-base.yaml, sdxl.yaml, ...)."
    return "Give a diffusers folder or hub id of this family."
