"""Named Stable Diffusion variants (one table, litgpt style) and the full-size architectures.

A :class:`Preset` records what is known about a variant *without loading it* (family, hub id,
latent shape, VAE scaling), so a CLI can link ``latent_channels`` before any weights exist.
The ``tiny-*`` presets are random look-alikes for tests; their modules are built in
:mod:`tadm.components.backbones.tiny`. ``FULL_SIZE_*`` are the real architectures' configs
(no weights), for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sd15", "sd21", "sdxl"]

#: parts a full pipeline folder holds, per family ("text" expands to these subfolders)
TEXT_SUBFOLDERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd15": (("text_encoder", "tokenizer"),),
    "sd21": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}


@dataclass(frozen=True)
class Preset:
    """What is known about a variant before loading it.

    ``latent_channels``, ``downsample_factor``, ``scaling_factor`` and ``shift_factor`` are the
    fallbacks a backbone reports until its VAE is loaded (after that it reads them from the VAE config). The
    prediction type is deliberately absent for real presets: it is read from the scheduler config.
    """

    name: str
    family: Family
    hub_id: str | None
    tiny: bool = False
    description: str = ""
    #: native training resolution in pixels (informational)
    resolution: int = 512
    #: width of the text context the UNet cross-attends to
    context_dim: int = 768
    latent_channels: int = 4
    downsample_factor: int = 8
    scaling_factor: float = 0.18215
    #: the SD VAEs have no latent shift (SD 3 / FLUX have one: :class:`~.dit_presets.DiTPreset`)
    shift_factor: float = 0.0
    #: tiny presets only: prediction type written into the tiny scheduler config
    tiny_prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    #: tiny presets only: base seed of the random weights (each module gets its own offset)
    seed: int = 0


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "sd15",
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            description="SD 1.5, eps-prediction, 512 px, CLIP ViT-L (768-d context)",
            resolution=512,
            context_dim=768,
        ),
        Preset(
            "sd21",
            "sd21",
            "stabilityai/stable-diffusion-2-1",
            description="SD 2.1, v-prediction, 768 px, OpenCLIP ViT-H (1024-d context)",
            resolution=768,
            context_dim=1024,
        ),
        Preset(
            "sd21-base",
            "sd21",
            "stabilityai/stable-diffusion-2-1-base",
            description="SD 2.1-base, eps-prediction, 512 px (the TADM paper's backbone)",
            resolution=512,
            context_dim=1024,
        ),
        Preset(
            "sdxl",
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            description="SDXL base 1.0, eps-prediction, 1024 px, two text encoders (2048-d context)",
            resolution=1024,
            context_dim=2048,
            scaling_factor=0.13025,
        ),
        Preset(
            "tiny-sd15",
            "sd15",
            None,
            tiny=True,
            description="random tiny SD 1.5 look-alike for tests (eps-prediction)",
            resolution=64,
            context_dim=32,
            seed=1500,
        ),
        Preset(
            "tiny-sd21",
            "sd21",
            None,
            tiny=True,
            description="random tiny SD 2.1 look-alike for tests (v-prediction, linear projections)",
            resolution=64,
            context_dim=32,
            tiny_prediction_type="v_prediction",
            seed=2100,
        ),
        Preset(
            "tiny-sdxl",
            "sdxl",
            None,
            tiny=True,
            description="random tiny SDXL look-alike for tests (two text encoders, text_time embedding)",
            resolution=64,
            context_dim=64,
            scaling_factor=0.13025,
            seed=3000,
        ),
    )
}


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name, with the list of known names in the error."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


#: diffusers configs of the real full-size architectures (no weights): benchmarks build them with
#: random weights to measure cost without a download
FULL_SIZE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
FULL_SIZE_UNETS = {
    "sd21-base": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}  # fmt: skip
