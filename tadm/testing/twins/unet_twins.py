"""Random tiny twins of the Stable Diffusion families (SD 1.5, 2.1, SDXL), for tests and CPU runs.

:class:`StableDiffusionTwin` is the real
:class:`~tadm.components.backbones.stable_diffusion.StableDiffusionBackbone` whose parts are built from
small configs with random weights (a few thousand parameters, the same diffusers/transformers module
classes as the real variant of its family), so every code path (including ``from_pretrained`` on a saved
folder, see :func:`save_tiny_pipeline`) runs on a CPU in seconds. Choose it in YAML by its class path::

    --model.backbone=tadm.testing.twins.unet_twins.StableDiffusionTwin --model.backbone.init_args.preset=tiny-sd21

Weights are seeded per module, so they are reproducible and independent of which other parts were built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from tadm.components.backbones.diffusers_base.variants import Variant, find_variant
from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
from tadm.components.backbones.stable_diffusion.unet_presets import Preset
from tadm.testing.twins.random_text_encoders import tiny_clip
from tadm.testing.twins.twin_weights import RandomWeights, seeded

#: what ``build_tiny_components(parts=...)`` accepts ("unet" brings the scheduler)
TINY_PARTS = ("vae", "unet", "text")


@dataclass(frozen=True)
class UNetTwinPreset(Preset):
    """A tiny look-alike of a Stable Diffusion family: its prediction type and the base seed of its random
    weights (each module gets its own offset)."""

    resolution: int = 64
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    seed: int = 0


TWIN_PRESETS: dict[str, UNetTwinPreset] = {
    p.name: p
    for p in (
        UNetTwinPreset(
            "tiny-sd15",
            "sd15",
            None,
            description="random tiny SD 1.5 look-alike for tests (eps-prediction)",
            context_dim=32,
            seed=1500,
        ),
        UNetTwinPreset(
            "tiny-sd21",
            "sd21",
            None,
            description="random tiny SD 2.1 look-alike for tests (v-prediction, linear projections)",
            context_dim=32,
            prediction_type="v_prediction",
            seed=2100,
        ),
        UNetTwinPreset(
            "tiny-sdxl",
            "sdxl",
            None,
            description="random tiny SDXL look-alike for tests (two text encoders, text_time embedding)",
            context_dim=64,
            scaling_factor=0.13025,
            seed=3000,
        ),
    )
}


def get_twin_preset(name: str | UNetTwinPreset) -> UNetTwinPreset:
    """A twin preset by name, with the known names in the error."""
    return find_variant(TWIN_PRESETS, name)


def twin_parts(parts: Iterable[str] | None) -> set[str]:
    """The ``parts`` (default: all of :data:`TINY_PARTS`) to build; an unknown part is an error."""
    wanted = set(TINY_PARTS if parts is None else parts)
    unknown = wanted - set(TINY_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {list(TINY_PARTS)}")
    return wanted


# VAE: four blocks because the rescaler relies on the real VAE's factor 8 = 2**(4-1); 8 groups
# so 16/32 channels are legal; one layer per block keeps a 64x64 encode/decode around 10 ms.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
# UNet: two levels, one cross-attention level, 2/4 heads; mirrors diffusers' own test configs.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    norm_num_groups=32,
)
TINY_UNET_FAMILY: dict[str, dict[str, Any]] = {
    "sd15": dict(cross_attention_dim=32),
    "sd21": dict(cross_attention_dim=32, use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32), as 768 + 1280 in SDXL
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text_embeds (32)
    ),
}
# SD1.x uses OpenAI CLIP (quick_gelu, pad = eos); SD2.x / SDXL's second encoder use OpenCLIP (gelu, pad "!").
TINY_TEXT_ACT = {"sd15": "quick_gelu", "sd21": "gelu", "sdxl": "quick_gelu"}
TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


def tiny_vae(preset: Variant, seed: int, **config: Any) -> Any:
    """The tiny VAE of ``preset`` (its latent channels, scaling and shift factor), seeded with ``seed``;
    ``config`` overrides :data:`TINY_VAE`."""
    from diffusers import AutoencoderKL

    cfg = dict(TINY_VAE, latent_channels=preset.latent_channels, **config)
    vae = seeded(
        seed,
        lambda: AutoencoderKL(
            **cfg, scaling_factor=preset.scaling_factor, shift_factor=preset.shift_factor or None
        ),
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != preset.downsample_factor:
        raise RuntimeError(f"tiny VAE gives factor {factor}, expected {preset.downsample_factor}")
    return vae


def build_tiny_components(
    preset: str | UNetTwinPreset, parts: Iterable[str] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Random tiny modules of a ``tiny-*`` preset, keyed like a diffusers pipeline's components.

    Returns ``vae``, ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer`` (and
    ``text_encoder_2``, ``tokenizer_2`` for SDXL), or only those of ``parts`` (``vae``, ``unet``
    -- which brings the scheduler -- and ``text``). Each module is seeded on its own (``seed``,
    default the preset's, plus a fixed offset), so its weights do not depend on which other
    parts were built, and the global RNG is left as it was.
    """
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    p = get_twin_preset(preset)
    wanted = twin_parts(parts)
    base = p.seed if seed is None else seed
    out: dict[str, Any] = {}

    if "vae" in wanted:
        out["vae"] = tiny_vae(p, base + 1)

    if "unet" in wanted:
        cfg = {**TINY_UNET, **TINY_UNET_FAMILY[p.family]}
        out["unet"] = seeded(base + 2, lambda: UNet2DConditionModel(**cfg))
        # the scheduler classes the real folders ship (PNDM, DDIM for 2.1 v-pred, Euler for SDXL)
        sched_cls = {"sd15": PNDMScheduler, "sd21": DDIMScheduler, "sdxl": EulerDiscreteScheduler}[p.family]
        sched_cfg = dict(TINY_SCHEDULER, prediction_type=p.prediction_type)
        if sched_cls is PNDMScheduler:
            sched_cfg.pop("clip_sample")
            sched_cfg["skip_prk_steps"] = True
        if sched_cls is EulerDiscreteScheduler:
            sched_cfg = {k: v for k, v in sched_cfg.items() if k not in ("clip_sample", "set_alpha_to_one")}
        out["scheduler"] = sched_cls(**sched_cfg)

    if "text" in wanted:
        out["text_encoder"], out["tokenizer"] = tiny_clip(
            base + 3, CLIPTextModel, TINY_TEXT_ACT[p.family], pad_token="!" if p.family == "sd21" else None
        )
        if p.family == "sdxl":
            out["text_encoder_2"], out["tokenizer_2"] = tiny_clip(
                base + 4, CLIPTextModelWithProjection, "gelu", pad_token="!", projection_dim=32
            )
    return out


def save_tiny_pipeline(preset: str | UNetTwinPreset, folder: str | Path, seed: int | None = None) -> Path:
    """Write a tiny preset as a diffusers pipeline folder (``model_index.json``, ``vae/``, ...).

    Saving through the real pipeline class makes the folder loadable by ``from_pretrained`` and
    by ``StableDiffusion(XL)Pipeline`` alike, so tests exercise the real loading path.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = get_twin_preset(preset)
    comps = build_tiny_components(p, seed=seed)
    if p.family == "sdxl":
        pipe = StableDiffusionXLPipeline(**comps)
    else:
        pipe = StableDiffusionPipeline(
            **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_vae(preset: str | UNetTwinPreset, folder: str | Path, seed: int | None = None) -> Path:
    """Write only a tiny VAE at the folder's root, laid out like ``stabilityai/sd-vae-ft-mse``."""
    vae = build_tiny_components(preset, parts=["vae"], seed=seed)["vae"]
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


class StableDiffusionTwin(RandomWeights, StableDiffusionBackbone):
    """A random tiny twin of a Stable Diffusion family, for tests (see the module docstring).

    Args:
        preset: ``tiny-sd15``, ``tiny-sd21`` (v-prediction) or ``tiny-sdxl``. With ``pretrained`` unset, every
            part gets random weights from the preset's small config; with it, the twin loads as the real
            backbone does.
        kwargs: the real backbone's arguments (see :class:`StableDiffusionBackbone`).
    """

    presets: ClassVar[dict[str, UNetTwinPreset]] = TWIN_PRESETS  # type: ignore[assignment]

    def __init__(self, preset: str = "tiny-sd21", **kwargs: Any) -> None:
        super().__init__(preset, **kwargs)

    def build_random_parts(self, parts: list[str]) -> dict[str, Any]:
        return build_tiny_components(self.preset, parts=parts)
