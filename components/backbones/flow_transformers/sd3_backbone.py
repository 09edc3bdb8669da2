"""Stable Diffusion 3.x (3.5 Medium / Large) as a TADM backbone: SD3Transformer2DModel + 16-channel VAE.

Weights come from a hub id or a local diffusers folder
(:mod:`~tadm.components.backbones.flow_transformers.flow_weight_loading`). The shared runtime is
:mod:`~tadm.components.backbones.flow_transformers.flow_backbone`; this module adds what is SD 3's own: the empty prompt through
CLIP-L, CLIP-G and T5-XXL exactly as ``StableDiffusion3Pipeline.encode_prompt`` does (CLIP penultimate
hidden states side by side, zero-padded to T5's width, followed by T5's tokens; pooled = both CLIPs'
projections), and the transformer call, which patches 2x2 latents itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from tadm.components.backbones.flow_transformers.flow_backbone import FlowTransformerBackbone
from tadm.contracts import BACKBONES


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
        preset: Named variant: ``sd35-medium`` or ``sd35-large``.
        kwargs: the arguments of every SD 3.x / FLUX.1 backbone (``prompt_embedding``, ``max_sequence_length``,
            ``dtype``, the transformer LoRA, ``reference_time``: see :class:`FlowTransformerBackbone`) and of
            every diffusers backbone (``pretrained``, ``vae``, ...: see :class:`DiffusersBackbone`).
    """

    family = "sd3"
    registered_name = "sd3"
    #: ``StableDiffusion3Pipeline.encode_prompt`` without classifier-free guidance: (prompt, negative,
    #: pooled, negative pooled)
    prompt_kwargs: ClassVar[dict[str, Any]] = {"prompt_3": None, "do_classifier_free_guidance": False}
    pooled_output = 2

    def __init__(self, preset: str = "sd35-medium", **kwargs: Any) -> None:
        super().__init__(preset, **kwargs)

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
