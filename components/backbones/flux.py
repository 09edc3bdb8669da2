"""FLUX.1 ([dev], [schnell]) as a TADM backbone: FluxTransformer2DModel on packed 2x2 latents.

The shared DiT runtime is :mod:`tadm.components.backbones.dit`; this module adds what is FLUX's own,
each step as ``FluxPipeline`` does it: the empty prompt through CLIP-L (pooled output) and T5-XXL
(``encode_prompt``), latents packed (B, 16, h, w) -> (B, h/2 * w/2, 64) with ``_pack_latents``, image
position ids from ``_prepare_latent_image_ids`` and zero text ids, the timestep passed as t / 1000, the
guidance embedding of [dev] fed a constant, and the output unpacked with ``_unpack_latents``. The rest
of tadm sees ordinary (B, 16, h, w) latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tadm.components.backbones.dit import Dtype, FlowTransformerBackbone
from tadm.contracts import BACKBONES
from tadm.ops.diffusion import ReferenceMap

#: the guidance FLUX.1 [dev] gets (its pipeline's default guidance_scale, and the value diffusers' FLUX
#: LoRA training scripts train at); schnell has no guidance embedding and ignores it
DEFAULT_GUIDANCE = 3.5


@BACKBONES.register(
    "flux",
    "FLUX.1 [dev] / [schnell] (rectified-flow transformer on packed latents, 16-channel VAE, CLIP-L + T5-XXL)",
)
class FluxBackbone(FlowTransformerBackbone):
    """FLUX.1: 16-channel VAE (scaling and shift factor), FluxTransformer2DModel on 2x2-packed latents.

    Construction records where weights come from; :meth:`load` builds the parts a stage needs (stage 1:
    the VAE alone). Timesteps are flow timesteps t = sigma * 1000 (the transformer gets t / 1000, as in
    the pipeline); TADM's configured timesteps are mapped to them by ``reference_time``.

    Args:
        preset: Named variant: ``flux1-dev``, ``flux1-schnell``, or ``tiny-flux`` (random weights, for tests).
        guidance: The constant fed to the guidance embedding of guidance-distilled FLUX.1 [dev] (default
            3.5: the pipeline's default and the value diffusers' FLUX LoRA scripts train at; the LoRA adapts
            to whatever constant is chosen, but a checkpoint must be used with the value it was trained at).
            Transformers without a guidance embedding ([schnell]) ignore it.
        pretrained: Hub id or local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (T5-XXL), tokenizers, ``scheduler/``).
            Default: the preset's hub id.
        vae: A separate VAE (hub id or a folder with the VAE at its root) instead of the pipeline's.
        revision: Hub revision of ``pretrained``.
        variant: Weight variant of ``pretrained``.
        prompt_embedding: A file written by ``tadm embed-prompt`` holding the empty-prompt embedding: no
            text encoder is loaded at all (T5-XXL is 4.7 B parameters). Default: embed with the encoders.
        max_sequence_length: T5 tokens of the empty prompt; default the preset's ([dev] 512, [schnell] 256).
        dtype: Weights of the transformer and text encoders in ``bfloat16`` / ``float16`` (default fp32;
            the 12 B transformer is 48 GB in fp32); the VAE stays fp32, LoRA weights are kept in fp32.
        sample_latent: Encode with a sample of the VAE posterior instead of its mean.
        local_files_only: Passed to ``from_pretrained`` (True: never touch the network).
        transformer_lora_rank: LoRA rank on the transformer blocks (stages ``enhancer`` / ``joint``).
        vae_lora_rank: LoRA rank on the VAE decoder; the encoder stays frozen.
        transformer_lora_alpha: peft ``lora_alpha`` of the transformer LoRA (default: the rank, scale 1).
        vae_lora_alpha: the same for the VAE-decoder LoRA.
        transformer_lora_targets: module-name suffixes that get LoRA; default: attention q/k/v/out of both
            streams and the single blocks, feed-forward, the packed-latent embedding and output projection.
        gradient_checkpointing: Recompute transformer / VAE-decoder activations in the backward pass.
        reference_time: How TADM's timesteps (written for SD's 1000-step DDPM schedule: TPM [10, 200],
            t0 = 50) become flow timesteps: ``noise_level`` (the same noise-to-signal ratio; [10, 200] ->
            [89.5, 363.7]) or ``fraction`` (the same fraction of the training schedule, shifted as at the
            native 1024 px). See docs/method.md.
    """

    family = "flux"
    registered_name = "flux"

    def __init__(
        self,
        preset: str = "flux1-dev",
        guidance: float = DEFAULT_GUIDANCE,
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
        super().__init__(
            preset,
            pretrained=pretrained,
            vae=vae,
            revision=revision,
            variant=variant,
            prompt_embedding=prompt_embedding,
            max_sequence_length=max_sequence_length,
            dtype=dtype,
            sample_latent=sample_latent,
            local_files_only=local_files_only,
            transformer_lora_rank=transformer_lora_rank,
            vae_lora_rank=vae_lora_rank,
            transformer_lora_alpha=transformer_lora_alpha,
            vae_lora_alpha=vae_lora_alpha,
            transformer_lora_targets=transformer_lora_targets,
            gradient_checkpointing=gradient_checkpointing,
            reference_time=reference_time,
        )
        self.guidance = float(guidance)

    def _check_latent_channels(self, vae: nn.Module, transformer: nn.Module) -> None:
        if int(transformer.config.in_channels) != 4 * int(vae.config.latent_channels):
            raise ValueError(
                f"backbone {self.backbone_id}: the transformer takes {transformer.config.in_channels} packed "
                f"channels (4 x latent channels) but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )

    def _encode_empty_prompt(self, parts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """ "" through ``FluxPipeline.encode_prompt``: T5 sequence embeddings and CLIP-L's pooled output."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, **self._text_parts(parts))
        prompt, pooled, _ = pipe.encode_prompt(
            prompt="",
            prompt_2=None,
            device=self._device_anchor.device,
            max_sequence_length=self.max_sequence_length,
        )
        return prompt, pooled

    def _transformer_call(self, z: Tensor, t: Tensor) -> Tensor:
        from diffusers import FluxPipeline

        tr = self.transformer
        assert tr is not None
        dtype = tr.dtype
        b, c, h, w = z.shape
        prompt, pooled = self._conditioning(b, dtype)
        packed = FluxPipeline._pack_latents(z.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, dtype)
        txt_ids = torch.zeros(prompt.shape[1], 3, device=z.device, dtype=dtype)
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=z.device, dtype=torch.float32)
        out = tr(
            hidden_states=packed,
            timestep=t / 1000,  # the pipeline's convention: the transformer multiplies by 1000 again
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # (B, h/2 * w/2, 64) -> (B, 16, h, w); its "height" is in pixels of a factor-1 "VAE": the latent's own
        return FluxPipeline._unpack_latents(out, h, w, 1)
