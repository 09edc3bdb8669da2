"""Stable Diffusion (1.5, 2.1, 2.1-base, SDXL) as a TADM backbone, composed from diffusers parts.

Only the parts a stage needs are loaded (stage 1: the VAE alone). Weights come from a hub id or a
local diffusers folder through the libraries' own ``from_pretrained``, or from one original
(Stability/CompVis layout) ``.safetensors`` / ``.ckpt`` file through diffusers' ``from_single_file``
with the configs of a local diffusers folder (:mod:`~tadm.components.backbones.stable_diffusion.unet_weight_loading`).
What it shares with the SD 3 / FLUX backbones (the arguments every family takes, parts, freezing, the
loading sequence, the LoRA stages, the VAE latent space) is
:class:`~tadm.components.backbones.diffusers_base.diffusers_backbone.DiffusersBackbone`; this module adds
the UNet call with the empty-prompt condition (SDXL: and its size embeddings), the DDPM schedule and
TADM's UNet LoRA.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tadm.components.backbones.diffusers_base.diffusers_backbone import DiffusersBackbone
from tadm.components.backbones.stable_diffusion.unet_presets import PRESETS, Preset
from tadm.components.backbones.stable_diffusion.unet_weight_loading import UNetWeightLoader
from tadm.contracts import BACKBONES

#: docs/method.md: LoRA targets on the UNet (conv_in is trained fully, not through LoRA)
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
#: peft adapter name of the UNet LoRA (it appears in checkpoint keys; the VAE decoder's: ``VAE_ADAPTER``)
UNET_ADAPTER = "tadm_unet"


@BACKBONES.register(
    "stable_diffusion", "Stable Diffusion 1.5 / 2.1 / 2.1-base / SDXL (VAE, UNet, text encoders)"
)
class StableDiffusionBackbone(DiffusersBackbone):
    """Stable Diffusion VAE (and, for the enhancer, UNet, noise schedule and text encoders).

    Construction only records where weights come from; :meth:`load` builds the named parts.
    Until the VAE is loaded, ``latent_channels`` / ``downsample_factor`` / ``scaling_factor``
    report the preset's known values, so a CLI can link them without touching weights.

    Args:
        preset: Named variant: ``sd15``, ``sd21``, ``sd21-base`` or ``sdxl``. Decides the family (which
            text encoders exist) and the fallback latent shape.
        single_file: Path to one ``.safetensors`` / ``.ckpt`` file in the ORIGINAL Stability/CompVis
            layout (e.g. ``v2-1_512-ema-pruned.safetensors``: ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``). The UNet,
            the VAE and the text encoder(s) are loaded from it with diffusers' ``from_single_file``;
            ``pretrained`` must then be a LOCAL diffusers folder of the same model that gives the
            configs (``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json``), the
            tokenizers and the scheduler; its weight files are not needed (except for a text encoder
            the file lacks: that one is read from the folder, with a warning). Nothing touches the
            network. Only the file's name enters ``backbone_id``.
        unet_lora_rank: LoRA rank on the UNet for stages ``enhancer``/``joint`` (TADM: 32; the
            release's script uses 48). ``conv_in`` is trained fully besides.
        unet_lora_alpha: peft's ``lora_alpha`` of the UNet LoRA; the update is scaled by alpha / rank.
            Default (None): alpha = rank, scale 1. The release leaves peft's default, 8 (rank 48:
            scale 1/6), so its weights only reproduce its outputs with ``unet_lora_alpha: 8``.
        unet_lora_targets: UNet module names (suffixes) that get LoRA; default: TADM's list
            (attention projections, ResNet convs, proj_in/out, feed-forward, conv_out).
        kwargs: what every diffusers backbone takes (``pretrained``, ``vae``, ``revision``, ``variant``,
            ``sample_latent``, ``local_files_only``, ``vae_lora_rank``, ``vae_lora_alpha``,
            ``gradient_checkpointing``: see :class:`DiffusersBackbone`).
    """

    registered_name = "stable_diffusion"
    unet: nn.Module | None  # the denoiser, set by load()
    presets: ClassVar[dict[str, Preset]] = PRESETS
    loader_class = UNetWeightLoader

    def __init__(
        self,
        preset: str = "sd21-base",
        single_file: str | None = None,
        unet_lora_rank: int = 32,
        unet_lora_alpha: float | None = None,
        unet_lora_targets: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.single_file = single_file  # read when the base class resolves the weight source
        super().__init__(preset, **kwargs)
        self.text_encoder: nn.Module | None = None
        self.text_encoder_2: nn.Module | None = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self.unet_lora_rank = unet_lora_rank
        self.unet_lora_alpha = unet_lora_alpha
        self.unet_lora_targets = list(unet_lora_targets or UNET_LORA_TARGETS)

    def _part_modules(self) -> tuple[nn.Module | None, ...]:
        return (self.vae, self.unet, self.text_encoder, self.text_encoder_2)

    def _check_latent_channels(self, vae: nn.Module, denoiser: nn.Module) -> None:
        if denoiser.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"backbone {self.backbone_id}: the UNet takes {denoiser.config.in_channels} latent "
                f"channels but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )

    # --- the enhancer: empty-prompt conditioning, one UNet call, trainable parts -------------
    def _encode_empty_prompt(self, text_parts: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The EMPTY prompt's embedding (and SDXL's pooled one) from the text encoders in ``text_parts``; the
        encoders are never needed again, so the backbone does not keep them."""
        pairs = [(text_parts["text_encoder"], text_parts["tokenizer"])]
        if self.preset.family == "sdxl":
            pairs.append((text_parts["text_encoder_2"], text_parts["tokenizer_2"]))
        hidden, pooled = [], None
        for encoder, tokenizer in pairs:
            length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
            ids = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids.to(self._device_anchor.device), output_hidden_states=True)
            if self.preset.family == "sdxl":  # SDXL: penultimate layer of both encoders, pooled from the 2nd
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                hidden.append(out[0])
        return torch.cat(hidden, dim=-1).float(), pooled.float() if pooled is not None else None

    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        """One UNet call on scaled latents at timesteps ``t`` (B,) with the empty-prompt condition."""
        self._require("unet")
        self._require("text")
        assert self.unet is not None and self.prompt_embeds is not None
        b = z_t.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        cond = self.prompt_embeds.expand(b, -1, -1).to(self.unet.dtype)
        kwargs: dict[str, Any] = {}
        if self.preset.family == "sdxl":
            h, w = (s * self.downsample_factor for s in z_t.shape[-2:])
            # (h, w, 0, 0, h, w): filled on the device, as torch.tensor([...]) would be a blocking host copy
            time_ids = torch.zeros(6, device=z_t.device, dtype=self.unet.dtype)
            time_ids[0::4].fill_(h)
            time_ids[1::4].fill_(w)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_prompt_embeds.expand(b, -1).to(self.unet.dtype),
                "time_ids": time_ids.expand(b, -1),
            }
        out = self.unet(z_t.to(self.unet.dtype), t.to(z_t.device), encoder_hidden_states=cond, **kwargs)
        return out.sample.float()

    def _denoiser_lora(self) -> tuple[str, int, float | None, list[str]]:
        return UNET_ADAPTER, self.unet_lora_rank, self.unet_lora_alpha, self.unet_lora_targets

    def _train_fully(self, denoiser: nn.Module) -> None:
        """conv_in is trained fully (docs/method.md), not through LoRA."""
        denoiser.conv_in.requires_grad_(True)

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> None:
        """NHWC memory format for the UNet and VAE; ``torch.compile`` of the UNet."""
        if channels_last:
            for part in (self.unet, self.vae):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if compile and self.unet is not None:
            self.unet = torch.compile(self.unet)

    def _set_schedule(self, scheduler: Any) -> None:
        """Training noise schedule as DDPM (whatever sampler the folder ships); v/eps from its config."""
        from diffusers import DDPMScheduler

        sched = (
            scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
        )
        self.scheduler = sched
        self.prediction_type = str(sched.config.prediction_type)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        # the base class's non-persistent buffer: follows .to(device), never written into checkpoints
        self.alphas_cumprod = sched.alphas_cumprod.detach().clone().float().to(self._device_anchor.device)
