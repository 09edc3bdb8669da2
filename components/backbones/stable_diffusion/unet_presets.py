"""Named Stable Diffusion variants (SD 1.5, 2.1, 2.1-base, SDXL): one table, litgpt style.

A :class:`Preset` is the shared :class:`~tadm.components.backbones.diffusers_base.variants.Variant`
(what is known before loading) plus the width of the text context the UNet cross-attends to. The
prediction type is deliberately absent: it is read from the scheduler config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tadm.components.backbones.diffusers_base.variants import Variant, find_variant, variant_table

Family = Literal["sd15", "sd21", "sdxl"]

#: parts a full pipeline folder holds, per family ("text" expands to these subfolders)
TEXT_SUBFOLDERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd15": (("text_encoder", "tokenizer"),),
    "sd21": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}


@dataclass(frozen=True)
class Preset(Variant):
    """A Stable Diffusion variant before loading it (see :class:`Variant`)."""

    family: Family
    #: width of the text context the UNet cross-attends to
    context_dim: int = 768


PRESETS: dict[str, Preset] = variant_table(
    (
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
    )
)


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name, with the list of known names in the error."""
    return find_variant(PRESETS, name)
