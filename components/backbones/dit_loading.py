"""Where SD 3.x / FLUX.1 weights come from: hub ids and local diffusers folders (or tiny random twins).

:class:`DiTWeightLoader` extends the Stable Diffusion loader (:mod:`tadm.components.backbones.sd_loading`):
the same missing-file and offline-hub errors (naming the file, the folder and the ``hf download`` that fixes
it), the same separate-VAE option, with the DiT families' module classes, and a check that a folder or a
transformer config is of the preset's family before anything is loaded (a FLUX folder under an SD 3
preset is an error naming both families, not a heap of "weights not initialised" warnings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadm.components.backbones.dit_presets import (
    PIPELINE_CLASSES,
    TEXT_SUBFOLDERS,
    family_hint,
    family_of_class,
)
from tadm.components.backbones.dit_tiny import build_tiny_dit_components
from tadm.components.backbones.sd_loading import SDWeightLoader, looks_like_path, pipeline_class_name

#: subfolders whose modules take ``torch_dtype`` (the big ones; the VAE always loads in fp32)
_DTYPE_PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class DiTWeightLoader(SDWeightLoader):
    """Builds the modules of the named parts of an SD 3.x / FLUX.1 preset (see the backbone's ``Args``).

    ``pretrained`` None means the preset's tiny random weights. ``torch_dtype`` (None: fp32) applies to the
    transformer and the text encoders. Nothing is frozen, moved or kept here.
    """

    torch_dtype: Any = None

    @property
    def family(self) -> str:
        return str(self.preset.family)

    def load(self, todo: list[str]) -> dict[str, Any]:
        """The modules of ``todo``: ``vae``; ``unet`` brings ``transformer`` and ``scheduler``; ``text`` the text
        encoders and tokenizers, keyed like the family's diffusers pipeline components."""
        tiny: dict[str, Any] = {}
        if self.pretrained is None:
            need = [p for p in todo if not (p == "vae" and self.vae_source)]
            tiny = build_tiny_dit_components(self.preset, parts=need) if need else {}  # type: ignore[arg-type]
            if self.torch_dtype is not None:  # as from_pretrained(torch_dtype=...) loads real weights
                tiny.update({k: v.to(self.torch_dtype) for k, v in tiny.items() if k in _DTYPE_PARTS})
        elif looks_like_path(self.pretrained):
            self.check_pipeline_class(Path(self.pretrained).expanduser())

        def get(part: str, sub: str) -> Any:
            return tiny[sub] if sub in tiny else self.from_pretrained(part, sub)

        new: dict[str, Any] = {}
        if "vae" in todo:
            new["vae"] = tiny["vae"] if "vae" in tiny else self.load_vae()
        if "unet" in todo:
            new["transformer"], new["scheduler"] = get("unet", "transformer"), get("unet", "scheduler")
        if "text" in todo:
            for enc_name, tok_name in TEXT_SUBFOLDERS[self.family]:
                new[enc_name], new[tok_name] = get("text", enc_name), get("text", tok_name)
        return new

    # --- weights that do not fit the preset ----------------------------------------------------
    def check_pipeline_class(self, folder: Path) -> None:
        """A local folder whose ``model_index.json`` names another family's pipeline is an error before any
        loading, naming both families and the presets that fit."""
        name = pipeline_class_name(folder)
        self._check_class(name, f"'{folder}': its model_index.json names a {name}")

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
    def from_pretrained(self, part: str, sub: str) -> Any:
        """Load one subfolder of ``pretrained`` with the class the family's pipeline uses there."""
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
        cls: Any = {
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
        t5_tokenizer = cls is T5TokenizerFast
        kind = (
            "text_encoder"
            if sub.startswith("text_encoder")
            else "tokenizer"
            if sub.startswith("tokenizer")
            else sub
        )
        src = self.pretrained
        assert src is not None
        kwargs: dict[str, Any] = {"subfolder": sub}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None and kind not in ("scheduler", "tokenizer"):
            kwargs["variant"] = self.variant
        if self.torch_dtype is not None and sub in _DTYPE_PARTS:
            kwargs["torch_dtype"] = self.torch_dtype
        local = looks_like_path(src)
        if local:
            src = str(Path(src).expanduser())
            if t5_tokenizer:
                self.check_t5_tokenizer(Path(src), sub)
            else:
                self.check_local(Path(src), sub, kind, variant=self.variant, what="`pretrained`")
        elif self.local_files_only is not None:
            kwargs["local_files_only"] = self.local_files_only
        try:
            if sub == "transformer":  # its config first: another family's transformer must not half-load
                config_kwargs = {k: v for k, v in kwargs.items() if k not in ("variant", "torch_dtype")}
                self.check_transformer_config(dict(cls.load_config(src, **config_kwargs)), f"'{src}/{sub}'")
            obj = cls.from_pretrained(src, **kwargs)
        except OSError as err:
            if local:
                raise
            raise self.hub_error(src, part, sub, err, key="pretrained") from err
        if kind == "tokenizer" and len(obj) < 3:
            # transformers 5 returns an EMPTY tokenizer instead of failing when no file is found
            err = OSError(f"no tokenizer files found for {src!r}/{sub}")
            if local:
                raise FileNotFoundError(f"{self.label}: {err}")
            raise self.hub_error(src, part, sub, err, key="pretrained")
        return obj

    def check_t5_tokenizer(self, folder: Path, sub: str) -> None:
        """A T5 tokenizer folder holds ``tokenizer.json`` or sentencepiece's ``spiece.model``."""
        if not folder.is_dir():  # the loader's own "folder does not exist" error
            self.check_local(folder, sub, "tokenizer", variant=None, what="`pretrained`")
        part = folder / sub
        if not any((part / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            raise FileNotFoundError(
                f"{self.label}: '{part / 'tokenizer.json'}' (or spiece.model) not found; expected a diffusers "
                f"folder with {sub}/tokenizer.json in '{folder}'"
            )
