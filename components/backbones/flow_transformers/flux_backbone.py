"""FLUX.1 ([dev], [schnell]) as a TADM backbone: FluxTransformer2DModel on packed 2x2 latents.

The shared runtime is :mod:`~tadm.components.backbones.flow_transformers.flow_backbone`; this module adds what is FLUX's own,
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

from tadm.components.backbones.flow_transformers.flow_backbone import FlowTransformerBackbone
from tadm.contracts import BACKBONES

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
        preset: Named variant: ``flux1-dev`` or ``flux1-schnell``.
        guidance: The constant fed to the guidance embedding of guidance-distilled FLUX.1 [dev] (default
            3.5: the pipeline's default and the value diffusers' FLUX LoRA scripts train at; the LoRA adapts
            to whatever constant is chosen, but a checkpoint must be used with the value it was trained at).
            Transformers without a guidance embedding ([schnell]) ignore it.
        kwargs: the arguments of every SD 3.x / FLUX.1 backbone (``prompt_embedding``, ``max_sequence_length``,
            ``dtype``, the transformer LoRA, ``reference_time``: see :class:`FlowTransformerBackbone`) and of
            every diffusers backbone (``pretrained``, ``vae``, ...: see :class:`DiffusersBackbone`).
    """

    family = "flux"
    registered_name = "flux"
    #: ``FluxPipeline.encode_prompt``: (T5 sequence embeddings, CLIP-L's pooled output, text ids)
    pooled_output = 1

    def __init__(self, preset: str = "flux1-dev", guidance: float = DEFAULT_GUIDANCE, **kwargs: Any) -> None:
        super().__init__(preset, **kwargs)
        self.guidance = float(guidance)

    def _check_latent_channels(self, vae: nn.Module, transformer: nn.Module) -> None:
        if int(transformer.config.in_channels) != 4 * int(vae.config.latent_channels):
            raise ValueError(
                f"backbone {self.backbone_id}: the transformer takes {transformer.config.in_channels} packed "
                f"channels (4 x latent channels) but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )

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
