"""Where diffusers backbone weights come from: hub ids, local diffusers folders, one original file.

:class:`WeightLoader` turns a variant and its sources into diffusers/transformers modules keyed like a
diffusers pipeline's components (``vae``, the denoiser and ``scheduler``, ``text_encoder*``,
``tokenizer*``); the backbone only freezes and uses them. Each family's loader
(:mod:`~tadm.components.backbones.stable_diffusion.unet_weight_loading`,
:mod:`~tadm.components.backbones.flow_transformers.flow_weight_loading`) says which class each subfolder
holds and which weights do not fit it. Loading is kept apart from the runtime because it is where the
failures are: a missing file in a local folder, an unreachable hub, a truncated or foreign single file.
Each is reported before (or instead of) the libraries' own errors, naming the file, the folder and a
way to fix it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tadm.components.backbones.diffusers_base.variants import Variant

#: weight file stems written by save_pretrained (diffusers models / transformers models)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


def looks_like_path(src: str) -> bool:
    """A string that cannot be a hub id (``org/name``) is meant as a local folder."""
    return (
        src.startswith(("/", ".", "~", "\\"))
        or src.count("/") > 1
        or "\\" in src
        or (len(src) > 1 and src[1] == ":")
        or Path(src).expanduser().exists()
    )


def pipeline_class_name(folder: Path) -> str:
    """The pipeline class a local folder's ``model_index.json`` names; "" when it has none or the file cannot
    be read (the loaders then report an unreadable folder in their own words)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return ""
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def _weight_candidates(folder: Path, stems: tuple[str, ...], variant: str | None) -> list[Path]:
    suffix = f".{variant}" if variant else ""
    names = []
    for stem in stems:
        names += [f"{stem}{suffix}.safetensors", f"{stem}{suffix}.bin"]
        names += [f"{stem}.safetensors.index{suffix}.json", f"{stem}.bin.index{suffix}.json"]
        names += [f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"] if suffix else []
    return [folder / n for n in names]


@dataclass(frozen=True)
class WeightLoader:
    """Builds the modules of the named parts from a variant's sources (see the backbone's ``Args``).

    Nothing is frozen, moved or kept here: :meth:`load` returns new modules and the caller decides what
    to do with them. ``torch_dtype`` (None: fp32) applies to the subfolders in :attr:`dtype_parts`.
    A family's loader subclasses it and supplies :meth:`part_class` and the checks of its own.
    """

    preset_name: str
    preset: Variant
    pretrained: str | None
    vae_source: str | None = None
    single_file: str | None = None
    revision: str | None = None
    variant: str | None = None
    local_files_only: bool | None = None
    torch_dtype: Any = None

    #: the subfolder of the denoiser (part ``unet``): ``unet`` or ``transformer``
    denoiser_part: ClassVar[str] = "unet"
    #: (text encoder, tokenizer) subfolders per family (part ``text``)
    text_subfolders: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {}
    #: subfolders whose modules take ``torch_dtype`` (the VAE always loads in fp32)
    dtype_parts: ClassVar[tuple[str, ...]] = ()
    #: what an original-layout single file of the family is called in errors
    single_file_kind: ClassVar[str] = "diffusers"

    @property
    def label(self) -> str:
        return f"backbone preset {self.preset_name!r}"

    @property
    def family(self) -> str:
        return str(self.preset.family)

    def load(self, todo: list[str]) -> dict[str, Any]:
        """The modules of ``todo`` (``vae``; ``unet`` brings the denoiser and ``scheduler``; ``text`` brings
        the text encoders and tokenizers), keyed like a diffusers pipeline's components."""
        assert self.pretrained is not None
        if looks_like_path(self.pretrained):
            self.check_pipeline_class(Path(self.pretrained).expanduser())
        single = self.read_single_file(todo) if self.single_file is not None else {}

        def get(part: str, sub: str) -> Any:  # the same modules: from a single file or from_pretrained
            if sub in single:
                return self.from_single_file(sub, single.pop(sub))
            return self.from_pretrained(part, sub)

        new: dict[str, Any] = {}
        if "vae" in todo:
            new["vae"] = get("vae", "vae") if "vae" in single else self.load_vae()
        if "unet" in todo:
            denoiser = self.denoiser_part
            new[denoiser], new["scheduler"] = get("unet", denoiser), get("unet", "scheduler")
            self.check_denoiser(dict(new[denoiser].config))
        if "text" in todo:
            for enc_name, tok_name in self.text_subfolders[self.family]:
                new[enc_name], new[tok_name] = get("text", enc_name), get("text", tok_name)
        return new

    # --- what a family supplies ----------------------------------------------------------------
    def part_class(self, sub: str) -> Any:
        """The diffusers / transformers class the family's pipeline keeps in subfolder ``sub``."""
        raise NotImplementedError

    def check_pipeline_class(self, folder: Path) -> None:
        """A local pipeline folder of another family (``model_index.json``) is an error before any loading."""

    def check_denoiser(self, config: dict[str, Any]) -> None:
        """Weights of another family in the denoiser's config are an error naming the preset to use."""

    def single_file_prefixes(self, todo: list[str]) -> dict[str, tuple[str, ...]]:
        """Where each wanted module lives in an original-layout single file, by diffusers subfolder."""
        raise ValueError(f"{self.label}: this backbone does not load `single_file` checkpoints")

    def check_local_part(self, folder: Path, sub: str, kind: str) -> None:
        """Fail before the libraries do when subfolder ``sub`` of a local ``pretrained`` lacks a file."""
        self.check_local(folder, sub, kind, variant=self.variant, what="`pretrained`")

    def check_before_loading(self, cls: Any, src: str, sub: str, kwargs: dict[str, Any]) -> None:
        """A last check of ``sub`` before its weights are read (e.g. its config's class)."""

    # --- diffusers folders and hub ids ---------------------------------------------------------
    def load_vae(self) -> nn.Module:
        """The pipeline's VAE, or the separate one given as ``vae`` (a hub id or a local folder)."""
        from diffusers import AutoencoderKL

        if self.vae_source is None:
            return self.from_pretrained("vae", "vae")
        src = self.vae_source
        if looks_like_path(src):
            folder = Path(src).expanduser()
            # a whole pipeline folder given as `vae:` is accepted too: use its vae/ subfolder
            sub = (
                "vae"
                if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists()
                else ""
            )
            self.check_local(folder, sub, "vae", variant=None, what="the VAE given as `vae`")
            return AutoencoderKL.from_pretrained(str(folder), subfolder=sub or None)
        kwargs = {} if self.local_files_only is None else {"local_files_only": self.local_files_only}
        try:
            return AutoencoderKL.from_pretrained(src, **kwargs)
        except OSError as err:
            raise self.hub_error(src, "vae", "", err, key="vae") from err

    def from_pretrained(self, part: str, sub: str) -> Any:
        """Load one subfolder of ``pretrained`` with the class that subfolder holds."""
        cls = self.part_class(sub)
        kind = next((k for k in ("text_encoder", "tokenizer") if sub.startswith(k)), sub)
        src = self.pretrained
        assert src is not None
        kwargs: dict[str, Any] = {"subfolder": sub}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None and kind not in ("scheduler", "tokenizer"):
            kwargs["variant"] = self.variant
        if self.torch_dtype is not None and sub in self.dtype_parts:
            kwargs["torch_dtype"] = self.torch_dtype
        local = looks_like_path(src)
        if local:
            src = str(Path(src).expanduser())
            self.check_local_part(Path(src), sub, kind)
        elif self.local_files_only is not None:
            kwargs["local_files_only"] = self.local_files_only
        try:
            self.check_before_loading(cls, src, sub, kwargs)
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

    def check_local(self, folder: Path, sub: str, kind: str, variant: str | None, what: str) -> None:
        """Fail before the libraries do, naming exactly the missing file and the folder."""
        label = self.label
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{label}: folder '{folder}' given as {what} does not exist; give an existing diffusers "
                f"folder or a hub id such as {self.preset.hub_id or 'stabilityai/stable-diffusion-2-1-base'!r}"
            )
        part = folder / sub if sub else folder
        rel = f"{sub}/" if sub else ""
        kind = kind.removesuffix("_2")
        if kind == "scheduler":
            required = [("scheduler_config.json",)]
        elif kind == "config":  # weights come from elsewhere (`single_file`)
            required = [("config.json",)]
        elif kind == "tokenizer":
            required = [("tokenizer.json", "vocab.json")]
        else:
            stems = _TRANSFORMERS_WEIGHTS if kind == "text_encoder" else _DIFFUSERS_WEIGHTS
            weights = tuple(p.name for p in _weight_candidates(part, stems, variant))
            required = [("config.json",), weights]
        layout = " and ".join(f"{rel}{alts[0]}" for alts in required)
        kind_word = "diffusers folder" if sub else "diffusers AutoencoderKL folder (files at its root)"
        for alts in required:
            if not any((part / name).is_file() for name in alts):
                first = part / alts[0]
                alt = " (or .bin)" if first.suffix == ".safetensors" else ""
                alt = " (or vocab.json + merges.txt)" if alts[0] == "tokenizer.json" else alt
                hint = "" if part.is_dir() else f" (the folder '{part}' does not exist)"
                raise FileNotFoundError(
                    f"{label}: '{first}'{alt} not found{hint}; expected a {kind_word} with {layout} in '{folder}'"
                )

    def hub_error(self, hub_id: str, part: str, sub: str, err: Exception, key: str) -> OSError:
        """What to do when a hub id cannot be loaded here (offline, or not in the HF cache)."""
        from huggingface_hub import constants

        where = f"part {part!r} (subfolder {sub!r})" if sub else f"part {part!r}"
        rev = f" --revision {self.revision}" if self.revision and key == "pretrained" else ""
        return OSError(
            f"{self.label}: cannot load {where} of hub model {hub_id!r}: no network / "
            f"Hugging Face Hub is reachable from here (or HF_HUB_OFFLINE / local_files_only is set), or the files are not in the "
            f"HF cache ({constants.HF_HUB_CACHE}). To fix: on a connected machine run "
            f"`hf download {hub_id}{rev} --local-dir /path/to/folder`, copy that folder here and set "
            f"`{key}: /path/to/folder`; or copy the HF cache folder to this machine. "
            f"Underlying error: {type(err).__name__}: {err}"
        )

    def read_single_file(self, todo: list[str]) -> dict[str, dict[str, Tensor]]:
        """The original-layout tensors of each wanted module (:meth:`single_file_prefixes`), by diffusers
        subfolder; read once.

        A ``.safetensors`` file is read lazily, so stage 1 reads only the VAE's tensors of a
        multi-GB file. A missing denoiser / VAE is an error; a missing text encoder falls back to the
        folder's weights with a warning.
        """
        assert self.single_file is not None
        path = Path(self.single_file).expanduser()
        label = self.label
        if not path.is_file():
            raise FileNotFoundError(f"{label}: single file '{path}' given as `single_file` not found")
        wanted = self.single_file_prefixes(todo)
        if not wanted:
            return {}
        prefixes = tuple(p for group in wanted.values() for p in group)
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    names = [k for k in f.keys() if k.startswith(prefixes)]  # noqa: SIM118 (not a dict)
                    tensors = {k: f.get_tensor(k) for k in names}
            else:  # .ckpt / .pt / .bin: torch.load (weights only), "state_dict" nesting unwrapped
                from diffusers.loaders.single_file_utils import load_single_file_checkpoint

                every = load_single_file_checkpoint(str(path), local_files_only=True)
                tensors = {k: v for k, v in every.items() if k.startswith(prefixes)}
                del every
        except Exception as err:
            raise ValueError(
                f"{label}: cannot read single file '{path}' as a checkpoint: {type(err).__name__}: {err}"
            ) from err
        out: dict[str, dict[str, Tensor]] = {}
        for sub, group in wanted.items():
            part = {k: v for k, v in tensors.items() if k.startswith(group)}
            if part:
                out[sub] = part
            elif sub in (self.denoiser_part, "vae"):
                raise ValueError(
                    f"{label}: single file '{path}' holds no {sub.upper()} weights (no keys under "
                    f"{' or '.join(repr(g) for g in group)}); it is not an original-layout {self.single_file_kind} "
                    f"checkpoint" + ("; give the VAE separately with `vae`" if sub == "vae" else "")
                )
            else:
                warnings.warn(
                    f"{label}: single file '{path}' holds no {sub} (no keys under {group[0]!r}); "
                    f"loading {sub} from '{self.pretrained}/{sub}' instead",
                    stacklevel=4,  # the caller of the backbone's load()
                )
        return out

    def from_single_file(self, sub: str, tensors: dict[str, Tensor]) -> nn.Module:
        """One module from the single file's original-layout tensors, configured by ``pretrained/sub``: a
        diffusers model through its ``from_single_file``, a CLIP text encoder through diffusers' converter."""
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        assert self.pretrained is not None and self.single_file is not None
        folder = Path(self.pretrained).expanduser()
        self.check_local(folder, sub, "config", variant=None, what="`pretrained` (configs for `single_file`)")
        kwargs: dict[str, Any] = {"config": str(folder), "subfolder": sub, "local_files_only": True}
        cls = self.part_class(sub)
        diffusers_model = sub in (self.denoiser_part, "vae")
        try:
            if diffusers_model:
                module = cls.from_single_file(tensors, **kwargs)
            else:
                module = create_diffusers_clip_model_from_ldm(cls, tensors, **kwargs)
        except Exception as err:
            # diffusers leaves absent tensors on the meta device and then fails to move them
            missing = _unconverted_keys(cls, folder, sub, tensors) if diffusers_model else []
            raise self._single_file_error(sub, folder, missing, err) from err
        missing = [k for k, v in module.state_dict().items() if v.is_meta]
        if missing:
            raise self._single_file_error(sub, folder, missing, None)
        return module

    def _single_file_error(
        self, sub: str, folder: Path, missing: list[str], err: Exception | None
    ) -> ValueError:
        where = f"single file '{self.single_file}'"
        if missing:
            return ValueError(
                f"{self.label}: {where} lacks {len(missing)} of {sub}'s tensors "
                f"(e.g. {missing[:3]}) for the config in '{folder / sub}': a truncated file or another model"
            )
        return ValueError(
            f"{self.label}: cannot load {sub} from {where} with the config in "
            f"'{folder / sub}' (a different model or family?): {type(err).__name__}: {err}"
        )


def _unconverted_keys(cls: Any, folder: Path, sub: str, tensors: dict[str, Tensor]) -> list[str]:
    """Tensors of the configured model that diffusers' original->diffusers mapping does not produce."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    try:
        config = cls.load_config(str(folder), subfolder=sub, local_files_only=True)
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        converted = convert(checkpoint=tensors, config=config)
        with torch.device("meta"):
            expected = cls.from_config(config).state_dict()
    except Exception:  # only used to explain another error: never hide that one
        return []
    return sorted(set(expected) - set(converted))
