"""Stable Diffusion 3.x (3.5 Medium / Large) as a TADM backbone: SD3Transformer2DModel + 16-channel VAE.

Weights come from a hub id or a local diffusers folder (:mod:`tadm.components.backbones.dit_loading`);
``tiny-sd3`` builds the same module classes with random weights
(:mod:`tadm.components.backbones.dit_tiny`). The shared DiT runtime is
:mod:`tadm.components.backbones.dit`; this module adds what is SD 3's own: the empty prompt through
CLIP-L, CLIP-G and T5-XXL exactly as ``StableDiffusion3Pipeline.encode_prompt`` does (CLIP penultimate
hidden states side by side, zero-padded to T5's width, followed by T5's tokens; pooled = both CLIPs'
projections), and the transformer call, which patches 2x2 latents itself.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tadm.components.backbones.dit import Dtype, FlowTransformerBackbone
from tadm.contracts import BACKBONES
from tadm.ops.diffusion import ReferenceMap


@BACKBONES.register(
    "sd3",
    "Stable Diffusion 3.5 Medium / Large (rectified-flow MMDiT, 16-channel VAE, CLIP-L + CLIP-G + T5-XXL)",
)
class SD3Backbone(FlowTransformerBackbone):
    """Stable Diffusion 3.x: 16-channel VAE (scaling and shift factor), SD3Transformer2DModel, flow time.

    Construction records where weights come from; :meth:`load` builds the parts a stage needs (stage 1:
    the VAE alone). Timesteps are flow timesteps t = sigma * 1000; TADM's configured timesteps (TPM range,
    t0) are mapped to them by ``reference_time``.

    Args:
        preset: Named variant: ``sd35-medium``, ``sd35-large``, or ``tiny-sd3`` (random weights, for tests).
        pretrained: Hub id or local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``). Default: the preset's hub id.
        vae: A separate VAE (hub id or a folder with the VAE at its root) instead of the pipeline's.
        revision: Hub revision of ``pretrained``.
        variant: Weight variant of ``pretrained`` (e.g. ``fp16``).
        prompt_embedding: A file written by ``tadm embed-prompt`` holding the empty-prompt embedding: no
            text encoder is loaded at all (T5-XXL is 4.7 B parameters). Default: embed with the encoders.
        max_sequence_length: T5 tokens of the empty prompt; default the preset's (SD 3 pipeline: 256).
        dtype: Weights of the transformer and text encoders in ``bfloat16`` / ``float16`` (default fp32);
            the VAE stays fp32, LoRA weights are kept in fp32 by peft.
        sample_latent: Encode with a sample of the VAE posterior instead of its mean.
        local_files_only: Passed to ``from_pretrained`` (True: never touch the network).
        transformer_lora_rank: LoRA rank on the transformer blocks (stages ``enhancer`` / ``joint``).
        vae_lora_rank: LoRA rank on the VAE decoder; the encoder stays frozen.
        transformer_lora_alpha: peft ``lora_alpha`` of the transformer LoRA (default: the rank, scale 1).
        vae_lora_alpha: the same for the VAE-decoder LoRA.
        transformer_lora_targets: module-name suffixes that get LoRA; default: attention q/k/v/out of both
            streams (and SD 3.5's second attention), feed-forward, patch embedding and output projection.
        gradient_checkpointing: Recompute transformer / VAE-decoder activations in the backward pass.
        reference_time: How TADM's timesteps (written for SD's 1000-step DDPM schedule: TPM [10, 200],
            t0 = 50) become flow timesteps: ``noise_level`` (the same noise-to-signal ratio; [10, 200] ->
            [89.5, 363.7]) or ``fraction`` (the same fraction of the shifted training schedule, shift 3:
            [29.4, 428.6]). See docs/method.md.
    """

    family = "sd3"
    registered_name = "sd3"

    def __init__(
        self,
        preset: str = "sd35-medium",
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

    def _check_latent_channels(self, vae: nn.Module, transformer: nn.Module) -> None:
        if int(transformer.config.in_channels) != int(vae.config.latent_channels):
            raise ValueError(
                f"backbone {self.backbone_id}: the transformer takes {transformer.config.in_channels} latent "
                f"channels but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )

    def _unused_modules(self) -> list[str]:
        """The last block is ``context_pre_only``: its text-token outputs are discarded, so the text queries
        (``attn.add_q_proj``) reach nothing."""
        assert self.transformer is not None
        return [
            f"transformer_blocks.{i}.attn.add_q_proj"
            for i, block in enumerate(self.transformer.transformer_blocks)
            if block.context_pre_only
        ]

    def _encode_empty_prompt(self, parts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """ "" through ``StableDiffusion3Pipeline.encode_prompt`` (no classifier-free guidance)."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **self._text_parts(parts))
        prompt, _, pooled, _ = pipe.encode_prompt(
            prompt="",
            prompt_2=None,
            prompt_3=None,
            device=self._device_anchor.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return prompt, pooled

    def _transformer_call(self, z: Tensor, t: Tensor) -> Tensor:
        tr = self.transformer
        assert tr is not None
        dtype = tr.dtype
        prompt, pooled = self._conditioning(z.shape[0], dtype)
        out = tr(
            hidden_states=z.to(dtype),
            timestep=t,  # the pipeline passes scheduler timesteps: sigma * 1000
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return out


__all__ = ["SD3Backbone"]
