"""What SD 3.x and FLUX.1 share as TADM backbones: a rectified-flow transformer behind the same contract.

The runtime of both families (:mod:`~tadm.components.backbones.sd3`, :mod:`~tadm.components.backbones.flux`
add the transformer call and the text encoders): parts loaded per stage (stage 1: the 16-channel VAE
alone), frozen modules, the empty prompt embedded once (or read from a ``tadm embed-prompt`` file) and the
text encoders freed, peft LoRA on the transformer blocks and the VAE decoder, and the flow time
convention (:class:`tadm.ops.diffusion.FlowTime`): t = sigma * 1000, velocity output, x0 = z_t - sigma v.
The rest of tadm sees ordinary (B, 16, h, w) latents; patching / packing happens inside ``predict``,
which pads odd latent sizes to the patch size and crops back. What it shares with the Stable Diffusion
runtime (parts, freezing, the LoRA stages, the VAE latent space) is
:class:`tadm.components.backbones.runtime.FrozenPartsRuntime`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.components.backbones.dit_loading import DiTWeightLoader
from tadm.components.backbones.dit_presets import DiTPreset, get_dit_preset
from tadm.components.backbones.lora import inject_lora, inject_vae_decoder_lora, train_only_lora
from tadm.components.backbones.prompt_embedding import (
    read_prompt_embedding,
    text_encoders_json,
    write_prompt_embedding,
)
from tadm.components.backbones.runtime import PARTS as PARTS
from tadm.components.backbones.runtime import FrozenPartsRuntime
from tadm.components.backbones.sd_loading import resolve_source
from tadm.contracts import DiffusionBackbone
from tadm.errors import ConfigError
from tadm.ops.diffusion import FLOW, FlowTime, ReferenceMap, scheduler_shift

log = logging.getLogger(__name__)

#: LoRA targets on the transformer (peft suffixes): the attention q/k/v/out of the image stream (SD 3.5's
#: second attention and FLUX's single blocks too), the context stream's projections, both streams'
#: feed-forward (FLUX single blocks: proj_mlp / proj_out), and the patch embedding / output projection,
#: which take the place of the UNet's conv_in / conv_out
TRANSFORMER_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "pos_embed.proj", "x_embedder",
)  # fmt: skip
#: peft adapter name of the transformer LoRA (it appears in checkpoint keys)
TRANSFORMER_ADAPTER = "tadm_transformer"
Dtype = Literal["float32", "bfloat16", "float16"]


class FlowTransformerBackbone(FrozenPartsRuntime, DiffusionBackbone):
    """Base of the SD 3.x and FLUX.1 backbones (see the subclasses for the arguments)."""

    family: ClassVar[str]
    registered_name: ClassVar[str]
    latent_multiple = 2

    def __init__(
        self,
        preset: str,
        pretrained: str | None = None,
        vae: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        prompt_embedding: str | None = None,
        max_sequence_length: int | None = None,
        dtype: Dtype | None = None,
        sample_latent: bool = False,
        local_files_only: bool | None = None,
        transformer_lora_rank: int = 32,
        vae_lora_rank: int = 16,
        transformer_lora_alpha: float | None = None,
        vae_lora_alpha: float | None = None,
        transformer_lora_targets: list[str] | None = None,
        gradient_checkpointing: bool = False,
        reference_time: ReferenceMap = "noise_level",
    ) -> None:
        super().__init__()
        self.preset_name = preset
        self.preset: DiTPreset = get_dit_preset(preset, self.family)
        self.pretrained = resolve_source(preset, self.preset, pretrained, None)  # type: ignore[arg-type]
        self.vae_source = vae
        self.revision = revision
        self.variant = variant
        self.prompt_embedding = prompt_embedding
        self.max_sequence_length = int(max_sequence_length or self.preset.max_sequence_length)
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype_name = dtype
        self.sample_latent = sample_latent
        self.local_files_only = local_files_only
        FlowTime(reference=reference_time)  # validates the name now, at parse time
        self.reference_time = reference_time
        self.vae: nn.Module | None = None
        self.transformer: nn.Module | None = None
        self.scheduler: Any = None
        self.num_train_timesteps: int | None = None
        self._flow_time: FlowTime | None = None
        self.transformer_lora_rank = transformer_lora_rank
        self.vae_lora_rank = vae_lora_rank
        self.transformer_lora_alpha = transformer_lora_alpha
        self.vae_lora_alpha = vae_lora_alpha
        self.transformer_lora_targets = list(transformer_lora_targets or TRANSFORMER_LORA_TARGETS)
        self.gradient_checkpointing = gradient_checkpointing
        self._lora_stage: str | None = None
        #: where the empty-prompt embedding came from (text encoders, or the file), for the metadata
        self._text_encoder_classes: dict[str, str] = {}
        self.register_buffer("prompt_embeds", None, persistent=False)
        self.register_buffer("pooled_prompt_embeds", None, persistent=False)
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    # --- what the rest of the framework reads ------------------------------------------------
    @property
    def source(self) -> str:
        return self.pretrained if self.pretrained is not None else f"random-seed{self.preset.seed}"

    @property
    def backbone_id(self) -> str:
        source = self.source
        if self.revision:
            source += f"@{self.revision}"
        if self.variant:
            source += f"[{self.variant}]"
        if self.vae_source:
            source += f"+vae={self.vae_source}"
        return f"{self.registered_name}:{self.preset_name}:{source}"

    @property
    def time_convention(self) -> FlowTime | None:  # type: ignore[override]
        """Rectified flow, t = sigma * 1000 (None until the transformer and its scheduler are loaded)."""
        return self._flow_time

    @property
    def _denoiser(self) -> nn.Module | None:
        return self.transformer

    def _part_modules(self) -> tuple[nn.Module | None, ...]:
        return (self.vae, self.transformer)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype_name is None else getattr(torch, self.dtype_name)

    # --- loading -----------------------------------------------------------------------------
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet`` = the transformer + schedule, ``text``); idempotent.

        ``text`` reads the ``prompt_embedding`` file when one is given (no text encoder is loaded), else it
        loads the encoders, embeds the empty prompt and frees them.
        """
        todo = self._parts_to_load(parts)
        if not todo:
            return
        from_file = None
        if "text" in todo and self.prompt_embedding is not None:
            from_file = self._read_prompt_file()
            todo.remove("text")
        # everything is loaded first and assigned only if all of it worked: no half-loaded parts
        new = self._loader().load(todo) if todo else {}
        vae, transformer = new.get("vae", self.vae), new.get("transformer", self.transformer)
        if vae is not None and transformer is not None:
            self._check_latent_channels(vae, transformer)
        # an embedding already there (or read now) must fit the transformer, checked before anything is kept
        known = from_file or (
            None if self.prompt_embeds is None else (self.prompt_embeds, self.pooled_prompt_embeds)
        )
        if known is not None and transformer is not None:
            where = "the text encoders" if self.prompt_embedding is None else f"'{self.prompt_embedding}'"
            self._check_conditioning(transformer, *known, where=where)
        encoded = None
        if "text" in todo:  # embedded with the new encoders before any of them is kept
            with torch.no_grad():
                encoded = self._encode_empty_prompt(new)
            if transformer is not None:
                self._check_conditioning(transformer, *encoded, where="the text encoders")
        for name, obj in new.items():
            if name == "scheduler":
                self._set_schedule(obj)
            elif isinstance(obj, nn.Module) and not name.startswith("text_encoder"):
                setattr(self, name, self._freeze(obj, self._device_anchor.device))
            elif not name.startswith(("text_encoder", "tokenizer")):
                setattr(self, name, obj)
        if from_file is not None or encoded is not None:
            self._set_prompt(*(from_file or encoded))  # type: ignore[misc]
        if encoded is not None:  # the encoders are never needed again
            self._text_encoder_classes = {
                k: type(v).__name__ for k, v in new.items() if k.startswith("text_encoder") and v is not None
            }

    def _loader(self) -> DiTWeightLoader:
        return DiTWeightLoader(
            preset_name=self.preset_name,
            preset=self.preset,  # type: ignore[arg-type]
            pretrained=self.pretrained,
            vae_source=self.vae_source,
            revision=self.revision,
            variant=self.variant,
            local_files_only=self.local_files_only,
            torch_dtype=self.torch_dtype,
        )

    def _check_latent_channels(self, vae: nn.Module, transformer: nn.Module) -> None:
        raise NotImplementedError

    def _set_schedule(self, scheduler: Any) -> None:
        """Flow time from the scheduler config: T, and the shift at the native resolution (``fraction`` map)."""
        config = dict(scheduler.config)
        self.scheduler = scheduler
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        side = self.preset.resolution // (self.preset.downsample_factor * 2)  # 2x2-latent patches per side
        self._flow_time = FlowTime(
            num_train_timesteps=self.num_train_timesteps,
            shift=scheduler_shift(config, side * side),
            reference=self.reference_time,
        )
        self.prediction_type = FLOW

    # --- the empty prompt --------------------------------------------------------------------
    def _encode_empty_prompt(self, parts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(prompt_embeds (1,L,D), pooled_prompt_embeds (1,P)) of "" through the family's pipeline code, with
        the text encoders and tokenizers in ``parts`` (frozen and moved here, then dropped by the caller)."""
        raise NotImplementedError

    def _text_parts(self, parts: dict[str, Any]) -> dict[str, Any]:
        """The encoders (frozen, on this backbone's device) and tokenizers of ``parts``."""
        device = self._device_anchor.device
        return {
            k: self._freeze(v, device) if isinstance(v, nn.Module) else v
            for k, v in parts.items()
            if k.startswith(("text_encoder", "tokenizer"))
        }

    def _set_prompt(self, prompt_embeds: Tensor, pooled: Tensor) -> None:
        device = self._device_anchor.device
        self.prompt_embeds = prompt_embeds.detach().float().to(device)
        self.pooled_prompt_embeds = pooled.detach().float().to(device)

    def _read_prompt_file(self) -> tuple[Tensor, Tensor]:
        """The file's embeddings, refused when written for another family / preset / length."""
        assert self.prompt_embedding is not None
        tensors, meta = read_prompt_embedding(self.prompt_embedding)
        where = f"prompt embedding '{self.prompt_embedding}'"
        if meta["family"] != self.family or meta["preset"] != self.preset_name:
            raise ConfigError(
                f"{where} was written for {meta['family']} preset {meta['preset']!r} ({meta['backbone_id']}), "
                f"but this backbone is {self.family} preset {self.preset_name!r}; write one with "
                f"`tadm embed-prompt --backbone CONFIG` for this backbone"
            )
        if int(meta["max_sequence_length"]) != self.max_sequence_length:
            raise ConfigError(
                f"{where} holds {meta['max_sequence_length']} T5 tokens, this backbone uses "
                f"max_sequence_length {self.max_sequence_length}"
            )
        if meta["source"] != self.source:
            log.warning(
                "%s was computed from %s, this backbone loads %s: fine for the same model in another place",
                where,
                meta["source"],
                self.source,
            )
        self._text_encoder_classes = dict(json.loads(meta["text_encoders"]))
        return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

    def _check_conditioning(self, transformer: nn.Module, prompt: Tensor, pooled: Tensor, where: str) -> None:
        """The embedding's widths must be what the transformer projects (joint_attention_dim, pooled_projection_dim)."""
        cfg = transformer.config
        want = (int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim))
        got = (int(prompt.shape[-1]), int(pooled.shape[-1]))
        if got != want:
            raise ConfigError(
                f"backbone {self.backbone_id}: the empty-prompt embedding from {where} has widths "
                f"(sequence {got[0]}, pooled {got[1]}) but the transformer takes ({want[0]}, {want[1]}): "
                "it belongs to another model"
            )

    def save_prompt_embedding(self, path: str | Path) -> Path:
        """Embed the empty prompt (loading only the text encoders) and write it for ``prompt_embedding``."""
        if self.prompt_embedding is not None:
            raise ValueError(
                f"backbone {self.backbone_id} already reads its prompt embedding from '{self.prompt_embedding}'; "
                "drop prompt_embedding to embed the prompt with the text encoders"
            )
        self.load(["text"])
        assert self.prompt_embeds is not None and self.pooled_prompt_embeds is not None
        meta = {
            "family": self.family,
            "preset": self.preset_name,
            "source": self.source,
            "backbone_id": self.backbone_id,
            "prompt": "",
            "max_sequence_length": str(self.max_sequence_length),
            "text_encoders": text_encoders_json(self._text_encoder_classes),
        }
        tensors = {"prompt_embeds": self.prompt_embeds, "pooled_prompt_embeds": self.pooled_prompt_embeds}
        return write_prompt_embedding(path, tensors, meta)

    # --- the enhancer ------------------------------------------------------------------------
    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        """One transformer call on scaled latents at flow timesteps ``t`` (B,) = sigma * 1000, empty-prompt
        conditioned; returns the velocity (B,C,h,w) in float32. Odd sizes are padded to the patch size."""
        self._require("unet")
        self._require("text")
        b, _, h, w = z_t.shape
        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        m = self.latent_multiple
        pad_h, pad_w = -h % m, -w % m
        z = F.pad(z_t, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else z_t
        out = self._transformer_call(z, t.to(z_t.device).float())
        return out[..., :h, :w].float()

    def _transformer_call(self, z: Tensor, t: Tensor) -> Tensor:
        """The family's transformer on (B,C,h,w) latents with h, w multiples of the patch size."""
        raise NotImplementedError

    def _conditioning(self, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        assert self.prompt_embeds is not None and self.pooled_prompt_embeds is not None
        return self.prompt_embeds.expand(b, -1, -1).to(dtype), self.pooled_prompt_embeds.expand(b, -1).to(
            dtype
        )

    def _add_lora(self) -> None:
        """peft LoRA on the transformer blocks and on the VAE decoder; nothing else trains."""
        assert self.transformer is not None and self.vae is not None
        inject_lora(
            self.transformer, TRANSFORMER_ADAPTER, self.transformer_lora_rank, self.transformer_lora_alpha,
            self.transformer_lora_targets, exclude=self._unused_modules() or None,
        )  # fmt: skip
        inject_vae_decoder_lora(self.vae, self.vae_lora_rank, self.vae_lora_alpha)
        train_only_lora(self.transformer, self.vae)
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
        self.train(self.training)

    def _unused_modules(self) -> list[str]:
        """Transformer modules whose output never reaches the prediction (no LoRA there: it would get no
        gradient, which DDP rejects). None in general."""
        return []

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> None:
        """NHWC for the VAE (the transformer is all linear layers); ``torch.compile`` of the transformer."""
        if channels_last and self.vae is not None:
            self.vae.to(memory_format=torch.channels_last)
        if compile and self.transformer is not None:
            self.transformer = torch.compile(self.transformer)
