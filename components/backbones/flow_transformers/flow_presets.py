"""Named rectified-flow transformer variants (SD 3.x, FLUX.1).

A :class:`FlowPreset` is the shared :class:`~tadm.components.backbones.diffusers_base.variants.Variant`
with the 16-channel latent's scaling AND shift factor as defaults, plus the T5 length of the empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tadm.components.backbones.diffusers_base.variants import Variant, find_variant, variant_table

FlowFamily = Literal["sd3", "flux"]

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
class FlowPreset(Variant):
    """An SD 3.x / FLUX.1 variant before loading it (see :class:`Variant`); FLUX's dynamic time shift is
    read at ``resolution``. ``max_sequence_length`` is the T5 length of the empty prompt, the pipelines'
    default for the variant (SD 3 pipeline: 256; FLUX.1-dev: 512, schnell: 256)."""

    family: FlowFamily
    resolution: int = 1024
    latent_channels: int = 16
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    max_sequence_length: int = 256


FLOW_PRESETS: dict[str, FlowPreset] = variant_table(
    (
        FlowPreset(
            "sd35-medium",
            "sd3",
            "stabilityai/stable-diffusion-3.5-medium",
            description="SD 3.5 Medium: MMDiT-X, 2.5 B, CLIP-L + CLIP-G + T5-XXL, time shift 3",
        ),
        FlowPreset(
            "sd35-large",
            "sd3",
            "stabilityai/stable-diffusion-3.5-large",
            description="SD 3.5 Large: MMDiT, 8.1 B, CLIP-L + CLIP-G + T5-XXL, time shift 3",
        ),
        FlowPreset(
            "flux1-dev",
            "flux",
            "black-forest-labs/FLUX.1-dev",
            description="FLUX.1 [dev]: 12 B, guidance-distilled (guidance embedding), CLIP-L + T5-XXL",
            scaling_factor=0.3611,
            shift_factor=0.1159,
            max_sequence_length=512,
        ),
        FlowPreset(
            "flux1-schnell",
            "flux",
            "black-forest-labs/FLUX.1-schnell",
            description="FLUX.1 [schnell]: 12 B, timestep-distilled (no guidance embedding), CLIP-L + T5-XXL",
            scaling_factor=0.3611,
            shift_factor=0.1159,
            max_sequence_length=256,
        ),
    )
)


def get_flow_preset(name: str | FlowPreset, family: str | None = None) -> FlowPreset:
    """Look a preset up by name (and check its family), with the known names in the error."""
    return find_variant(FLOW_PRESETS, name, family)
