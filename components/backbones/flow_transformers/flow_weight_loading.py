"""Where SD 3.x / FLUX.1 weights come from: the shared diffusers loader with the flow families' classes.

:class:`FlowWeightLoader` adds to :class:`~tadm.components.backbones.diffusers_base.weight_loading.WeightLoader`
(the missing-file and offline-hub errors naming the file, the folder and the ``hf download`` that fixes it,
the separate-VAE option) the class each pipeline subfolder holds, ``torch_dtype`` for the big modules, T5
tokenizer folders, and a check that a folder or a transformer config is of the preset's family before
anything is loaded (a FLUX folder under an SD 3 preset is an error naming both families, not a heap of
"weights not initialised" warnings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tadm.components.backbones.diffusers_base.variants import family_hint, family_of_class
from tadm.components.backbones.diffusers_base.weight_loading import WeightLoader, pipeline_class_name
from tadm.components.backbones.flow_transformers.flow_presets import PIPELINE_CLASSES, TEXT_SUBFOLDERS

#: subfolders whose modules take ``torch_dtype`` (the big ones; the VAE always loads in fp32)
DTYPE_PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class FlowWeightLoader(WeightLoader):
    """Builds the modules of the named parts of an SD 3.x / FLUX.1 preset (see the backbone's ``Args``)."""

    denoiser_part: ClassVar[str] = "transformer"
    text_subfolders: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = TEXT_SUBFOLDERS
    dtype_parts: ClassVar[tuple[str, ...]] = DTYPE_PARTS

    def part_class(self, sub: str) -> Any:
        """The class the family's pipeline uses in subfolder ``sub``."""
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxTransformer2DModel,
            SD3Transformer2DModel,
        )
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        sd3 = self.family == "sd3"
        return {
            "vae": AutoencoderKL,
            "transformer": SD3Transformer2DModel if sd3 else FluxTransformer2DModel,
            "scheduler": FlowMatchEulerDiscreteScheduler,
            "text_encoder": CLIPTextModelWithProjection if sd3 else CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection if sd3 else T5EncoderModel,
            "text_encoder_3": T5EncoderModel,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer if sd3 else T5TokenizerFast,
            "tokenizer_3": T5TokenizerFast,
        }[sub]

    # --- weights that do not fit the preset ----------------------------------------------------
    def check_pipeline_class(self, folder: Path) -> None:
        """A local folder whose ``model_index.json`` names another family's pipeline is an error before any
        loading, naming both families and the presets that fit."""
        name = pipeline_class_name(folder)
        self._check_class(name, f"'{folder}': its model_index.json names a {name}")

    def check_before_loading(self, cls: Any, src: str, sub: str, kwargs: dict[str, Any]) -> None:
        """The transformer's config first: another family's transformer must not half-load."""
        if sub == "transformer":
            config_kwargs = {k: v for k, v in kwargs.items() if k not in ("variant", "torch_dtype")}
            self.check_transformer_config(dict(cls.load_config(src, **config_kwargs)), f"'{src}/{sub}'")

    def check_transformer_config(self, config: dict[str, Any], where: str) -> None:
        """A transformer config of another family (``_class_name``) is an error naming both."""
        name = str(config.get("_class_name", ""))
        self._check_class(name, f"{where}: it holds a {name}")

    def _check_class(self, name: str, what: str) -> None:
        found = family_of_class(name) if name else None
        if found is None or found == self.family:
            return
        raise ValueError(
            f"{self.label} (family {self.family}, {PIPELINE_CLASSES[self.family]}) does not match {what} "
            f"(family {found}). {family_hint(found)}"
        )

    # --- diffusers folders and hub ids ---------------------------------------------------------
    def check_local_part(self, folder: Path, sub: str, kind: str) -> None:
        """A T5 tokenizer folder holds ``tokenizer.json`` or sentencepiece's ``spiece.model``."""
        if not (kind == "tokenizer" and self.part_class(sub).__name__ == "T5TokenizerFast"):
            super().check_local_part(folder, sub, kind)
            return
        if not folder.is_dir():  # the loader's own "folder does not exist" error
            self.check_local(folder, sub, "tokenizer", variant=None, what="`pretrained`")
        part = folder / sub
        if not any((part / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            raise FileNotFoundError(
                f"{self.label}: '{part / 'tokenizer.json'}' (or spiece.model) not found; expected a diffusers "
                f"folder with {sub}/tokenizer.json in '{folder}'"
            )
