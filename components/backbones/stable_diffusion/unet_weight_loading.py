"""Where Stable Diffusion weights come from: the shared diffusers loader with SD's module classes.

:class:`UNetWeightLoader` adds to :class:`~tadm.components.backbones.diffusers_base.weight_loading.WeightLoader`
what is Stable Diffusion's own: the class each pipeline subfolder holds, where each part lives in an
original (Stability/CompVis) single file, and the checks that weights are of the preset's family (an SDXL
UNet under an SD 2.1 preset, or a transformer pipeline folder, is an error naming the preset to use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tadm.components.backbones.diffusers_base.variants import family_hint, family_of_class
from tadm.components.backbones.diffusers_base.weight_loading import WeightLoader, pipeline_class_name
from tadm.components.backbones.stable_diffusion.unet_presets import PRESETS, TEXT_SUBFOLDERS

#: where each part lives in an original (Stability/CompVis) single file, per family; text encoders
#: are keyed by the diffusers subfolder they replace
SINGLE_FILE_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd15": {"text_encoder": ("cond_stage_model.transformer.",)},
    "sd21": {"text_encoder": ("cond_stage_model.model.",)},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
}
SINGLE_FILE_UNET = ("model.diffusion_model.",)
SINGLE_FILE_VAE = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class UNetWeightLoader(WeightLoader):
    """Builds the modules of the named parts of a Stable Diffusion preset (see the backbone's ``Args``)."""

    text_subfolders: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = TEXT_SUBFOLDERS
    single_file_kind: ClassVar[str] = "Stable Diffusion"

    def part_class(self, sub: str) -> Any:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return {
            "vae": AutoencoderKL,
            "unet": UNet2DConditionModel,
            "scheduler": DDPMScheduler,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer,
        }[sub]

    def single_file_prefixes(self, todo: list[str]) -> dict[str, tuple[str, ...]]:
        wanted: dict[str, tuple[str, ...]] = {}
        if "unet" in todo:
            wanted["unet"] = SINGLE_FILE_UNET
        if "vae" in todo and self.vae_source is None:
            wanted["vae"] = SINGLE_FILE_VAE
        if "text" in todo:
            wanted.update(SINGLE_FILE_PREFIXES[self.family])
        return wanted

    # --- weights that do not fit the preset ----------------------------------------------------
    def check_pipeline_class(self, folder: Path) -> None:
        """A local pipeline folder of another family (``model_index.json``) is an error before any loading."""
        name = pipeline_class_name(folder)
        found = family_of_class(name) if name else None
        if found in ("sd3", "flux"):  # a transformer (DiT) pipeline: it has no unet/ to load
            raise ValueError(
                f"{self.label} (family {self.family}) does not match '{folder}': its model_index.json "
                f"names a {name} (family {found}). {family_hint(found)}"
            )
        if name and ("XL" in name) != (self.family == "sdxl"):
            raise ValueError(
                f"{self.label} (family {self.family}) does not match '{folder}': its model_index.json "
                f"names a {name}. {_preset_hint('sdxl' if 'XL' in name else None)}"
            )

    def check_denoiser(self, config: dict[str, Any]) -> None:
        """An SDXL UNet (size embeddings, two text encoders) under a non-SDXL preset, or the reverse, is an
        error naming the preset to use; otherwise the first forward dies deep inside diffusers."""
        xl = config.get("addition_embed_type") == "text_time"
        if xl == (self.family == "sdxl"):
            return
        where = self.pretrained or self.single_file or "the preset's weights"
        kind = "an SDXL UNet (text_time size embeddings)" if xl else "a UNet without SDXL's size embeddings"
        raise ValueError(
            f"{self.label} (family {self.family}) does not match the weights in '{where}': they hold "
            f"{kind}. {_preset_hint('sdxl' if xl else None)}"
        )


def _preset_hint(family: str | None) -> str:
    """Which shipped presets (and backbone configs) fit weights of ``family`` (None: any non-SDXL one)."""
    fits = [p.name for p in PRESETS.values() if (p.family == "sdxl") == (family == "sdxl")]
    configs = ", ".join(f"configs/backbone/{name}.yaml" for name in fits)
    return f"Use preset {' or '.join(repr(n) for n in fits)} (compose {configs}) for these weights."
