"""What every diffusers backbone shares: the Stable Diffusion UNets and the SD 3 / FLUX transformers.

Both compose frozen diffusers parts, loaded per stage under the part names ``vae``, ``unet`` (the
denoiser: the UNet or the transformer, with its noise schedule) and ``text`` (the empty-prompt
embedding); both add LoRA on the denoiser and the VAE decoder for the enhancer stages
(:mod:`~tadm.components.backbones.diffusers_base.lora_adapters`) and keep every fully frozen part in eval
mode; and both map images to scaled latents z = (E(x) - shift_factor) * scaling_factor, decoded by
D(z / scaling_factor + shift_factor). The Stable Diffusion VAEs are the shift-0 case.
:class:`DiffusersBackbone` holds that once, with the arguments every family takes and the loading
sequence; a family (:mod:`~tadm.components.backbones.stable_diffusion`,
:mod:`~tadm.components.backbones.flow_transformers`) supplies its variants, its weight loader, the
denoiser call, its noise schedule and how it embeds the empty prompt.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tadm.components.backbones.diffusers_base.lora_adapters import (
    inject_lora,
    inject_vae_decoder_lora,
    train_only_lora,
)
from tadm.components.backbones.diffusers_base.variants import Variant, find_variant
from tadm.components.backbones.diffusers_base.weight_loading import WeightLoader, looks_like_path
from tadm.contracts import DiffusionBackbone

#: the parts :meth:`DiffusionBackbone.load` takes, in the order they are loaded
PARTS = ("vae", "unet", "text")


class DiffusersBackbone(DiffusionBackbone):
    """Frozen diffusers parts behind the backbone contract; a family subclasses it (see its ``Args``).

    Construction only records where weights come from; :meth:`load` builds the named parts. Until the VAE
    is loaded, ``latent_channels`` / ``downsample_factor`` / ``scaling_factor`` / ``shift_factor`` report
    the preset's known values, so a CLI can link them without touching weights.

    Args:
        preset: Named variant of the family (see the family's ``preset``).
        pretrained: Hub id or local diffusers pipeline folder (``model_index.json`` and a subfolder per part:
            ``vae/``, ``unet/`` or ``transformer/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``).
            Default: the preset's hub id.
        vae: A separate VAE to use instead of the pipeline's, as a hub id or local folder holding the VAE at
            its root (e.g. ``stabilityai/sd-vae-ft-mse``). Also wins over ``single_file``.
        revision: Hub revision (branch, tag or commit) of ``pretrained``; not applied to ``vae``.
        variant: Weight variant of ``pretrained`` (e.g. ``fp16`` loads
            ``diffusion_pytorch_model.fp16.safetensors``); not applied to ``vae``.
        sample_latent: Encode with a sample of the VAE posterior instead of its mean. The mean
            (default) makes latents deterministic, so they can be precomputed and cached.
        local_files_only: Passed to ``from_pretrained``: True never touches the network, None
            leaves the libraries' default (``HF_HUB_OFFLINE``). Local folders never use it.
        vae_lora_rank: LoRA rank on the VAE decoder for stages ``enhancer``/``joint`` (TADM: 16); the
            encoder always stays frozen.
        vae_lora_alpha: peft's ``lora_alpha`` of the VAE-decoder LoRA; the update is scaled by alpha / rank.
            Default (None): alpha = rank, scale 1 (the release: 8 at rank 16, scale 1/2).
        gradient_checkpointing: Recompute denoiser (UNet / transformer) and VAE-decoder activations in the
            backward pass: much less memory for about a third more time.
    """

    #: the name the family is registered under; the first field of ``backbone_id``
    registered_name: ClassVar[str]
    #: the family's named variants, and the family a preset must be of (None: any in the table)
    presets: ClassVar[Mapping[str, Variant]]
    family: ClassVar[str | None] = None
    #: how the family's weights are loaded
    loader_class: ClassVar[type[WeightLoader]]
    #: one original-layout file to load the parts from (only the Stable Diffusion backbone takes one)
    single_file: str | None = None

    def __init__(
        self,
        preset: str,
        pretrained: str | None = None,
        vae: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        sample_latent: bool = False,
        local_files_only: bool | None = None,
        vae_lora_rank: int = 16,
        vae_lora_alpha: float | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.preset_name = preset
        self.preset: Any = find_variant(self.presets, preset, self.family)
        self.pretrained = self._resolve_source(pretrained)
        self.vae_source = vae
        self.revision = revision
        self.variant = variant
        self.sample_latent = sample_latent
        self.local_files_only = local_files_only
        self.vae_lora_rank = vae_lora_rank
        self.vae_lora_alpha = vae_lora_alpha
        self.gradient_checkpointing = gradient_checkpointing
        # frozen modules, filled by load(); plain submodule attributes so callers can wrap them
        self.vae: nn.Module | None = None
        setattr(self, self.loader_class.denoiser_part, None)
        self.scheduler: Any = None
        self.num_train_timesteps: int | None = None
        self._lora_stage: str | None = None
        #: the classes of the text encoders the empty-prompt embedding came from
        self._text_encoder_classes: dict[str, str] = {}
        # empty-prompt conditioning, computed once when the text part is loaded (then encoders are freed)
        self.register_buffer("prompt_embeds", None, persistent=False)
        self.register_buffer("pooled_prompt_embeds", None, persistent=False)
        # follows .to(device) so parts loaded after the module was moved land on the same device
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    def _resolve_source(self, pretrained: str | None) -> str | None:
        """The pipeline source to load from, checked at construction so a bad config fails at parse time."""
        source = pretrained if pretrained is not None else self.preset.hub_id
        if source is None:
            raise ValueError(
                f"backbone preset {self.preset_name!r} has no hub id; set `pretrained` to a hub id or folder"
            )
        if self.single_file is not None and not looks_like_path(source):
            hub = self.preset.hub_id or "stabilityai/stable-diffusion-2-1-base"
            raise ValueError(
                f"backbone preset {self.preset_name!r}: `single_file` needs `pretrained` to be a local diffusers "
                f"folder with the model's configs, tokenizers and scheduler (got {source!r}); get one with "
                f"`hf download {hub} --exclude '*.safetensors' '*.bin' '*.ckpt' --local-dir /path/to/folder`"
            )
        return source

    # --- what the rest of the framework reads ------------------------------------------------
    @property
    def source(self) -> str:
        """Where the weights come from (the hub id or folder)."""
        return str(self.pretrained)

    @property
    def backbone_id(self) -> str:
        source = self.source
        if self.revision:
            source += f"@{self.revision}"
        if self.variant:
            source += f"[{self.variant}]"
        if self.single_file:
            source += f"+single_file={Path(self.single_file).name}"
        if self.vae_source:
            source += f"+vae={self.vae_source}"
        return f"{self.registered_name}:{self.preset_name}:{source}"

    @property
    def _denoiser(self) -> nn.Module | None:
        """The loaded diffusion model (part ``unet``): the UNet or the transformer."""
        return getattr(self, self.loader_class.denoiser_part)

    def _part_modules(self) -> tuple[nn.Module | None, ...]:
        """Every module this backbone may hold; the fully frozen ones stay in eval mode."""
        return (self.vae, self._denoiser)

    # --- loading -----------------------------------------------------------------------------
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet`` = the denoiser + schedule, ``text``); idempotent.

        ``text`` embeds the empty prompt with the text encoders, which are then freed (or, where the family
        reads one, takes the embedding from a file). Everything is loaded first and assigned only if all of
        it worked: no half-loaded parts.
        """
        todo = self._parts_to_load(parts)
        if not todo:
            return
        from_file = self._prompt_from_file(todo)
        if from_file is not None:
            todo.remove("text")
        new = self._build_parts(todo) if todo else {}
        vae = new.get("vae", self.vae)
        denoiser = new.get(self.loader_class.denoiser_part, self._denoiser)
        if vae is not None and denoiser is not None:
            self._check_latent_channels(vae, denoiser)
        # an embedding already there (or read now) must fit the denoiser, checked before anything is kept
        known = from_file or (
            None if self.prompt_embeds is None else (self.prompt_embeds, self.pooled_prompt_embeds)
        )
        if known is not None and denoiser is not None:
            self._check_conditioning(denoiser, *known, where=self._prompt_origin())
        encoded = None
        if "text" in todo:  # embedded with the new encoders before any of them is kept
            with torch.no_grad():
                encoded = self._encode_empty_prompt(self._text_parts(new))
            if denoiser is not None:
                self._check_conditioning(denoiser, *encoded, where="the text encoders")
        device = self._device_anchor.device
        for name, obj in new.items():
            if name == "scheduler":
                self._set_schedule(obj)
            elif not name.startswith(("text_encoder", "tokenizer")):
                setattr(self, name, self._freeze(obj, device) if isinstance(obj, nn.Module) else obj)
        if from_file is not None or encoded is not None:
            self._set_prompt(*(from_file or encoded))  # type: ignore[misc]
        if encoded is not None:  # the encoders are never needed again
            self._text_encoder_classes = {
                k: type(v).__name__ for k, v in new.items() if k.startswith("text_encoder") and v is not None
            }

    def _build_parts(self, todo: list[str]) -> dict[str, Any]:
        """New modules of the parts in ``todo``, keyed like the family's diffusers pipeline components."""
        return self._loader().load(todo)

    def _loader(self) -> WeightLoader:
        """The loader for this backbone's weight sources (built per call: it holds no modules)."""
        return self.loader_class(
            preset_name=self.preset_name,
            preset=self.preset,
            pretrained=self.pretrained,
            vae_source=self.vae_source,
            single_file=self.single_file,
            revision=self.revision,
            variant=self.variant,
            local_files_only=self.local_files_only,
            torch_dtype=self.torch_dtype,
        )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype the big modules are loaded in (None: as stored, fp32)."""
        return None

    def _text_parts(self, parts: dict[str, Any]) -> dict[str, Any]:
        """The encoders (frozen, on this backbone's device) and tokenizers of ``parts``."""
        device = self._device_anchor.device
        return {
            k: self._freeze(v, device) if isinstance(v, nn.Module) else v
            for k, v in parts.items()
            if k.startswith(("text_encoder", "tokenizer"))
        }

    def _set_prompt(self, prompt_embeds: Tensor, pooled: Tensor | None) -> None:
        device = self._device_anchor.device
        self.prompt_embeds = prompt_embeds.detach().float().to(device)
        self.pooled_prompt_embeds = None if pooled is None else pooled.detach().float().to(device)

    # --- what a family supplies ----------------------------------------------------------------
    def _check_latent_channels(self, vae: nn.Module, denoiser: nn.Module) -> None:
        """The denoiser must take the latent channels the VAE gives."""
        raise NotImplementedError

    def _encode_empty_prompt(self, text_parts: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """(prompt_embeds, pooled_prompt_embeds or None) of "" with the (frozen) text encoders and tokenizers
        in ``text_parts``; the caller drops the encoders afterwards."""
        raise NotImplementedError

    def _set_schedule(self, scheduler: Any) -> None:
        """The training noise schedule / time convention from the loaded scheduler."""
        raise NotImplementedError

    def _prompt_from_file(self, todo: list[str]) -> tuple[Tensor, Tensor] | None:
        """The empty-prompt embedding read from a file instead of the text encoders (None: embed it)."""
        return None

    def _prompt_origin(self) -> str:
        """Where the empty-prompt embedding comes from, for errors."""
        return "the text encoders"

    def _check_conditioning(
        self, denoiser: nn.Module, prompt: Tensor, pooled: Tensor | None, where: str
    ) -> None:
        """An embedding of widths the denoiser does not take is an error naming ``where`` it came from."""

    def _denoiser_lora(self) -> tuple[str, int, float | None, list[str]]:
        """(adapter name, rank, alpha, target module suffixes) of the denoiser's LoRA."""
        raise NotImplementedError

    def _unused_modules(self) -> list[str]:
        """Denoiser modules whose output never reaches the prediction (no LoRA there: it would get no
        gradient, which DDP rejects). None in general."""
        return []

    def _train_fully(self, denoiser: nn.Module) -> None:
        """Denoiser modules trained fully besides LoRA (none in general)."""

    def _add_lora(self) -> None:
        """peft LoRA on the denoiser and on the VAE decoder; nothing else trains (but :meth:`_train_fully`)."""
        denoiser, vae = self._denoiser, self.vae
        assert denoiser is not None and vae is not None
        adapter, rank, alpha, targets = self._denoiser_lora()
        inject_lora(denoiser, adapter, rank, alpha, targets, exclude=self._unused_modules() or None)
        inject_vae_decoder_lora(vae, self.vae_lora_rank, self.vae_lora_alpha)
        train_only_lora(denoiser, vae)
        self._train_fully(denoiser)
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        self.train(self.training)  # parts with trainable weights now follow the train/eval mode

    # --- parts ---------------------------------------------------------------------------------
    @property
    def loaded_parts(self) -> frozenset[str]:
        names = {"vae": self.vae, "unet": self._denoiser, "text": self.prompt_embeds}
        return frozenset(k for k, v in names.items() if v is not None)

    def _parts_to_load(self, parts: Iterable[str]) -> list[str]:
        """The named parts not loaded yet, in :data:`PARTS` order; an unknown name is an error."""
        wanted = [parts] if isinstance(parts, str) else list(parts)
        unknown = sorted(set(wanted) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown backbone parts {unknown}; choose from {list(PARTS)}")
        return [p for p in PARTS if p in wanted and p not in self.loaded_parts]

    def _require(self, part: str) -> None:
        if part not in self.loaded_parts:
            raise RuntimeError(
                f"backbone {self.backbone_id}: part {part!r} is not loaded; call load_for_stage(...)"
            )

    @staticmethod
    def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
        module.requires_grad_(False)
        return module.eval().to(device)

    # --- training: LoRA in the enhancer stages -------------------------------------------------
    def load_for_stage(self, stage: str) -> None:
        super().load_for_stage(stage)
        if stage in ("enhancer", "joint") and self._lora_stage is None:
            self._add_lora()
            self._lora_stage = stage

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        if stage not in ("enhancer", "joint"):
            return []
        parts = (self._denoiser, self.vae)
        return [p for m in parts if m is not None for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> Any:
        """Keep fully frozen parts in eval mode when the LightningModule switches to training."""
        super().train(mode)
        for module in self._part_modules():
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    # --- latent space --------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels) if self.vae is not None else self.preset.latent_channels

    @property
    def downsample_factor(self) -> int:
        if self.vae is None:
            return self.preset.downsample_factor
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else self.preset.scaling_factor

    @property
    def shift_factor(self) -> float:
        """The latent shift: z = (E(x) - shift) * scale (the VAE config's, none meaning 0; the SD VAEs: 0)."""
        if self.vae is None:
            return self.preset.shift_factor
        return float(self.vae.config.shift_factor or 0.0)

    def _require_vae(self) -> nn.Module:
        if self.vae is None:
            raise RuntimeError(
                f"backbone {self.backbone_id}: the VAE is not loaded; call load(['vae']) or load_for_stage(...)"
            )
        return self.vae

    def encode(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> (E(x) - shift_factor) * scaling_factor, computed in the VAE's dtype,
        returned as float32."""
        vae = self._require_vae()
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != vae.config.in_channels:
            raise ValueError(f"encode expects images (B,{vae.config.in_channels},H,W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the VAE downsampling factor {f}; pad or crop it "
                f"(e.g. to {math.ceil(h / f) * f}x{math.ceil(w / f) * f})"
            )
        with self._vae_autocast(x):
            dist = vae.encode(x.to(vae.dtype)).latent_dist
        z = dist.sample() if self.sample_latent else dist.mean
        return ((z.float() - self.shift_factor) * self.scaling_factor).float()

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1]: D(z / scaling_factor + shift_factor) in the VAE's dtype, float32."""
        vae = self._require_vae()
        raw = z.float() / self.scaling_factor + self.shift_factor
        with self._vae_autocast(z):
            return vae.decode(raw.to(vae.dtype)).sample.float().clamp(-1, 1)

    def _vae_autocast(self, x: Tensor) -> Any:
        """VAEs flagged ``force_upcast`` (SDXL's) overflow in fp16 into NaN / black images: run them
        in their own dtype (fp32) even inside a ``16-mixed`` autocast region. An fp16-fixed VAE
        (``force_upcast: false`` in its config) keeps autocast."""
        if self.vae is not None and self.vae.config.force_upcast:
            return torch.autocast(device_type=x.device.type, enabled=False)
        return contextlib.nullcontext()
