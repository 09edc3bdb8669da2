"""What SD 3.x and FLUX.1 share as TADM backbones: a rectified-flow transformer behind the same contract.

The runtime of both families (:mod:`~tadm.components.backbones.flow_transformers.sd3_backbone`,
:mod:`~tadm.components.backbones.flow_transformers.flux_backbone` add the transformer call and the text
encoders) over the shared diffusers base
(:class:`~tadm.components.backbones.diffusers_base.diffusers_backbone.DiffusersBackbone`: parts loaded per
stage, frozen modules, LoRA on the denoiser and the VAE decoder, the VAE latent space): the empty prompt
embedded once or read from a ``tadm embed-prompt`` file, the weights' dtype, and the flow time convention
(:class:`tadm.ops.diffusion.FlowTime`): t = sigma * 1000, velocity output, x0 = z_t - sigma v. The rest of
tadm sees ordinary (B, 16, h, w) latents; patching / packing happens inside ``predict``, which pads odd
latent sizes to the patch size and crops back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.components.backbones.diffusers_base.diffusers_backbone import DiffusersBackbone
from tadm.components.backbones.flow_transformers.flow_presets import (
    FLOW_PRESETS,
    PIPELINE_CLASSES,
    FlowPreset,
)
from tadm.components.backbones.flow_transformers.flow_weight_loading import FlowWeightLoader
from tadm.components.backbones.flow_transformers.prompt_embedding_file import (
    read_prompt_embedding,
    text_encoders_json,
    write_prompt_embedding,
)
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


class FlowTransformerBackbone(DiffusersBackbone):
    """Base of the SD 3.x and FLUX.1 backbones: a 16-channel VAE (scaling and shift factor), a
    rectified-flow transformer, flow time.

    Construction records where weights come from; :meth:`load` builds the parts a stage needs (stage 1:
    the VAE alone). Timesteps are flow timesteps t = sigma * 1000; TADM's configured timesteps (TPM range,
    t0) are mapped to them by ``reference_time``.

    Args:
        preset: Named variant of the family (see the family's ``preset``).
        prompt_embedding: A file written by ``tadm embed-prompt`` holding the empty-prompt embedding: no
            text encoder is loaded at all (T5-XXL is 4.7 B parameters). Default: embed with the encoders.
        max_sequence_length: T5 tokens of the empty prompt; default the preset's (SD 3: 256; FLUX.1 [dev]
            512, [schnell] 256).
        dtype: Weights of the transformer and text encoders in ``bfloat16`` / ``float16`` (default fp32;
            FLUX's 12 B transformer is 48 GB in fp32); the VAE stays fp32, LoRA weights are kept in fp32 by
            peft.
        transformer_lora_rank: LoRA rank on the transformer blocks (stages ``enhancer`` / ``joint``).
        transformer_lora_alpha: peft ``lora_alpha`` of the transformer LoRA (default: the rank, scale 1).
        transformer_lora_targets: module-name suffixes that get LoRA; default: attention q/k/v/out of both
            streams (SD 3.5's second attention, FLUX's single blocks), feed-forward, the patch (FLUX: packed
            latent) embedding and the output projection.
        reference_time: How TADM's timesteps (written for SD's 1000-step DDPM schedule: TPM [10, 200],
            t0 = 50) become flow timesteps: ``noise_level`` (the same noise-to-signal ratio; [10, 200] ->
            [89.5, 363.7]) or ``fraction`` (the same fraction of the training schedule, shifted as at the
            native resolution; SD 3, shift 3: [29.4, 428.6]). See docs/method.md.
        kwargs: what every diffusers backbone takes (``pretrained``, ``vae``, ``revision``, ``variant``,
            ``sample_latent``, ``local_files_only``, ``vae_lora_rank``, ``vae_lora_alpha``,
            ``gradient_checkpointing``: see :class:`DiffusersBackbone`).
    """

    family: ClassVar[str]
    transformer: nn.Module | None  # the denoiser, set by load()
    presets: ClassVar[dict[str, FlowPreset]] = FLOW_PRESETS
    #: what the family's ``encode_prompt`` takes besides the prompt, and where its output holds the pooled one
    prompt_kwargs: ClassVar[dict[str, Any]] = {}
    pooled_output: ClassVar[int]
    loader_class = FlowWeightLoader
    latent_multiple = 2

    def __init__(
        self,
        preset: str,
        prompt_embedding: str | None = None,
        max_sequence_length: int | None = None,
        dtype: Dtype | None = None,
        transformer_lora_rank: int = 32,
        transformer_lora_alpha: float | None = None,
        transformer_lora_targets: list[str] | None = None,
        reference_time: ReferenceMap = "noise_level",
        **kwargs: Any,
    ) -> None:
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        FlowTime(reference=reference_time)  # validates the name now, at parse time
        super().__init__(preset, **kwargs)
        self.prompt_embedding = prompt_embedding
        self.max_sequence_length = int(max_sequence_length or self.preset.max_sequence_length)
        self.dtype_name = dtype
        self.reference_time = reference_time
        self._flow_time: FlowTime | None = None
        self.transformer_lora_rank = transformer_lora_rank
        self.transformer_lora_alpha = transformer_lora_alpha
        self.transformer_lora_targets = list(transformer_lora_targets or TRANSFORMER_LORA_TARGETS)

    # --- what the rest of the framework reads ------------------------------------------------
    @property
    def time_convention(self) -> FlowTime | None:  # type: ignore[override]
        """Rectified flow, t = sigma * 1000 (None until the transformer and its scheduler are loaded)."""
        return self._flow_time

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype_name is None else getattr(torch, self.dtype_name)

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
    def _prompt_from_file(self, todo: list[str]) -> tuple[Tensor, Tensor] | None:
        """``text`` reads the ``prompt_embedding`` file when one is given: no text encoder is loaded."""
        return self._read_prompt_file() if "text" in todo and self.prompt_embedding is not None else None

    def _prompt_origin(self) -> str:
        return "the text encoders" if self.prompt_embedding is None else f"'{self.prompt_embedding}'"

    def _encode_empty_prompt(self, text_parts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """ "" through the family's own pipeline ``encode_prompt`` (SD 3: CLIP penultimate hidden states side by
        side, zero-padded to T5's width, then T5's tokens; FLUX: T5's embeddings and CLIP-L's pooled output)."""
        import diffusers

        pipeline = getattr(diffusers, PIPELINE_CLASSES[self.family])
        pipe = pipeline(transformer=None, scheduler=None, vae=None, **text_parts)
        out = pipe.encode_prompt(
            prompt="",
            prompt_2=None,
            device=self._device_anchor.device,
            max_sequence_length=self.max_sequence_length,
            **self.prompt_kwargs,
        )
        return out[0], out[self.pooled_output]

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

    def _denoiser_lora(self) -> tuple[str, int, float | None, list[str]]:
        return (
            TRANSFORMER_ADAPTER,
            self.transformer_lora_rank,
            self.transformer_lora_alpha,
            self.transformer_lora_targets,
        )

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> None:
        """NHWC for the VAE (the transformer is all linear layers); ``torch.compile`` of the transformer."""
        if channels_last and self.vae is not None:
            self.vae.to(memory_format=torch.channels_last)
        if compile and self.transformer is not None:
            self.transformer = torch.compile(self.transformer)
