"""Stable Diffusion (1.5, 2.1, 2.1-base, SDXL) as a TADM backbone, composed from diffusers parts.

Only the parts a stage needs are loaded (stage 1: the VAE alone). Weights come from a hub id or a
local diffusers folder through the libraries' own ``from_pretrained``, or from one original
(Stability/CompVis layout) ``.safetensors`` / ``.ckpt`` file through diffusers' ``from_single_file``
with the configs of a local diffusers folder (all in :mod:`tadm.components.backbones.sd_loading`);
``tiny-*`` presets build the same module classes with random weights (see
:mod:`tadm.components.backbones.tiny`). This module is the runtime: all loaded modules are frozen,
later stages add LoRA on top, and encode/decode/predict run them; what it shares with the SD 3 / FLUX
runtime (parts, freezing, the LoRA stages, the VAE latent space) is
:class:`tadm.components.backbones.runtime.FrozenPartsRuntime`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadm.components.backbones.lora import VAE_ADAPTER as VAE_ADAPTER  # re-exported: release keys
from tadm.components.backbones.lora import VAE_DECODER_LORA_REGEX as VAE_DECODER_LORA_REGEX
from tadm.components.backbones.lora import inject_lora, inject_vae_decoder_lora, train_only_lora
from tadm.components.backbones.presets import get_preset
from tadm.components.backbones.runtime import PARTS as PARTS
from tadm.components.backbones.runtime import FrozenPartsRuntime
from tadm.components.backbones.sd_loading import SDWeightLoader, resolve_source
from tadm.contracts import BACKBONES, DiffusionBackbone

#: docs/method.md: LoRA targets on the UNet (conv_in is trained fully, not through LoRA)
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
#: peft adapter name of the UNet LoRA (it appears in checkpoint keys; the VAE decoder's: ``VAE_ADAPTER``)
UNET_ADAPTER = "tadm_unet"


#: what the ``text`` part loads; used once to embed the empty prompt, never kept
TEXT_PARTS = frozenset({"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"})


@BACKBONES.register(
    "stable_diffusion", "Stable Diffusion 1.5 / 2.1 / 2.1-base / SDXL (VAE, UNet, text encoders)"
)
class StableDiffusionBackbone(FrozenPartsRuntime, DiffusionBackbone):
    """Stable Diffusion VAE (and, for the enhancer, UNet, noise schedule and text encoders).

    Construction only records where weights come from; :meth:`load` builds the named parts.
    Until the VAE is loaded, ``latent_channels`` / ``downsample_factor`` / ``scaling_factor``
    report the preset's known values, so a CLI can link them without touching weights.

    Args:
        preset: Named variant: ``sd15``, ``sd21``, ``sd21-base``, ``sdxl`` or a random tiny one
            for tests (``tiny-sd15``, ``tiny-sd21``, ``tiny-sdxl``). Decides the family (which
            text encoders exist) and the fallback latent shape.
        pretrained: Hub id or local diffusers pipeline folder (``model_index.json``, ``vae/``,
            ``unet/``, ...). Default: the preset's hub id; tiny presets build random weights.
        vae: A separate VAE to use instead of the pipeline's, as a hub id or local folder holding
            the VAE at its root (e.g. ``stabilityai/sd-vae-ft-mse``). Also wins over ``single_file``.
        single_file: Path to one ``.safetensors`` / ``.ckpt`` file in the ORIGINAL Stability/CompVis
            layout (e.g. ``v2-1_512-ema-pruned.safetensors``: ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``). The UNet,
            the VAE and the text encoder(s) are loaded from it with diffusers' ``from_single_file``;
            ``pretrained`` must then be a LOCAL diffusers folder of the same model that gives the
            configs (``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json``), the
            tokenizers and the scheduler; its weight files are not needed (except for a text encoder
            the file lacks: that one is read from the folder, with a warning). Nothing touches the
            network. Only the file's name enters ``backbone_id``.
        revision: Hub revision (branch, tag or commit) of ``pretrained``; not applied to ``vae``.
        variant: Weight variant of ``pretrained`` (e.g. ``fp16`` loads
            ``diffusion_pytorch_model.fp16.safetensors``); not applied to ``vae``.
        sample_latent: Encode with a sample of the VAE posterior instead of its mean. The mean
            (default) makes latents deterministic, so they can be precomputed and cached.
        local_files_only: Passed to ``from_pretrained``: True never touches the network, None
            leaves the libraries' default (``HF_HUB_OFFLINE``). Local folders never use it.
        unet_lora_rank: LoRA rank on the UNet for stages ``enhancer``/``joint`` (TADM: 32; the
            release's script uses 48). ``conv_in`` is trained fully besides.
        vae_lora_rank: LoRA rank on the VAE decoder (TADM: 16); the encoder always stays frozen.
        unet_lora_alpha: peft's ``lora_alpha`` of the UNet LoRA; the update is scaled by alpha / rank.
            Default (None): alpha = rank, scale 1. The release leaves peft's default, 8 (rank 48:
            scale 1/6), so its weights only reproduce its outputs with ``unet_lora_alpha: 8``.
        vae_lora_alpha: the same for the VAE-decoder LoRA (release: 8 at rank 16, scale 1/2).
        unet_lora_targets: UNet module names (suffixes) that get LoRA; default: TADM's list
            (attention projections, ResNet convs, proj_in/out, feed-forward, conv_out).
        gradient_checkpointing: Recompute UNet / VAE-decoder activations in the backward pass:
            much less memory for about a third more time.
    """

    def __init__(
        self,
        preset: str = "sd21-base",
        pretrained: str | None = None,
        vae: str | None = None,
        single_file: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        sample_latent: bool = False,
        local_files_only: bool | None = None,
        unet_lora_rank: int = 32,
        vae_lora_rank: int = 16,
        unet_lora_alpha: float | None = None,
        vae_lora_alpha: float | None = None,
        unet_lora_targets: list[str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.preset_name = preset
        self.preset = get_preset(preset)
        self.pretrained = resolve_source(preset, self.preset, pretrained, single_file)
        self.single_file = single_file
        self.vae_source = vae
        self.revision = revision
        self.variant = variant
        self.sample_latent = sample_latent
        self.local_files_only = local_files_only
        # frozen modules, filled by load(); plain submodule attributes so callers can wrap them
        self.vae: nn.Module | None = None
        self.unet: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.text_encoder_2: nn.Module | None = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self.scheduler: Any = None
        self.num_train_timesteps: int | None = None
        self.unet_lora_rank = unet_lora_rank
        self.vae_lora_rank = vae_lora_rank
        self.unet_lora_alpha = unet_lora_alpha
        self.vae_lora_alpha = vae_lora_alpha
        self.unet_lora_targets = list(unet_lora_targets or UNET_LORA_TARGETS)
        self.gradient_checkpointing = gradient_checkpointing
        self._lora_stage: str | None = None
        # empty-prompt conditioning, computed once when the text part is loaded (then encoders are freed)
        self.register_buffer("prompt_embeds", None, persistent=False)
        self.register_buffer("pooled_prompt_embeds", None, persistent=False)
        # follows .to(device) so parts loaded after the module was moved land on the same device
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    # --- what the rest of the framework reads ------------------------------------------------
    @property
    def backbone_id(self) -> str:
        source = self.pretrained if self.pretrained is not None else f"random-seed{self.preset.seed}"
        if self.revision:
            source += f"@{self.revision}"
        if self.variant:
            source += f"[{self.variant}]"
        if self.single_file:
            source += f"+single_file={Path(self.single_file).name}"
        if self.vae_source:
            source += f"+vae={self.vae_source}"
        return f"stable_diffusion:{self.preset_name}:{source}"

    @property
    def _denoiser(self) -> nn.Module | None:
        return self.unet

    def _part_modules(self) -> tuple[nn.Module | None, ...]:
        return (self.vae, self.unet, self.text_encoder, self.text_encoder_2)

    # --- loading -----------------------------------------------------------------------------
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet`` + schedule, ``text``); idempotent."""
        todo = self._parts_to_load(parts)
        if not todo:
            return
        # everything is loaded first and assigned only if all of it worked: no half-loaded parts
        new = self._loader().load(todo)
        vae, unet = new.get("vae", self.vae), new.get("unet", self.unet)
        if vae is not None and unet is not None and unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"backbone {self.backbone_id}: the UNet takes {unet.config.in_channels} latent "
                f"channels but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )
        device = self._device_anchor.device
        new = {k: self._freeze(v, device) if isinstance(v, nn.Module) else v for k, v in new.items()}
        # the empty prompt is embedded with the new encoders before anything is kept; they are then dropped
        embeds = self._encode_empty_prompt(new) if "text" in todo else None
        for name, obj in new.items():
            if name == "scheduler":
                self._set_schedule(obj)
            elif name not in TEXT_PARTS:
                setattr(self, name, obj)
        if embeds is not None:
            self.prompt_embeds, self.pooled_prompt_embeds = embeds

    def _loader(self) -> SDWeightLoader:
        """The loader for this backbone's weight sources (built per call: it holds no modules)."""
        return SDWeightLoader(
            preset_name=self.preset_name,
            preset=self.preset,
            pretrained=self.pretrained,
            vae_source=self.vae_source,
            single_file=self.single_file,
            revision=self.revision,
            variant=self.variant,
            local_files_only=self.local_files_only,
        )

    # --- the enhancer: empty-prompt conditioning, one UNet call, trainable parts -------------
    @torch.no_grad()
    def _encode_empty_prompt(self, parts: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The EMPTY prompt's embedding (and SDXL's pooled one) from the text encoders in ``parts``; the
        encoders are never needed again, so the backbone does not keep them."""
        pairs = [(parts["text_encoder"], parts["tokenizer"])]
        if self.preset.family == "sdxl":
            pairs.append((parts["text_encoder_2"], parts["tokenizer_2"]))
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
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=z_t.device, dtype=self.unet.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_prompt_embeds.expand(b, -1).to(self.unet.dtype),
                "time_ids": time_ids.expand(b, -1),
            }
        out = self.unet(z_t.to(self.unet.dtype), t.to(z_t.device), encoder_hidden_states=cond, **kwargs)
        return out.sample.float()

    def _add_lora(self) -> None:
        """peft LoRA on the UNet (TADM's targets) and the VAE decoder; conv_in trained fully."""
        assert self.unet is not None and self.vae is not None
        inject_lora(
            self.unet, UNET_ADAPTER, self.unet_lora_rank, self.unet_lora_alpha, self.unet_lora_targets
        )
        inject_vae_decoder_lora(self.vae, self.vae_lora_rank, self.vae_lora_alpha)
        train_only_lora(self.unet, self.vae)
        self.unet.conv_in.requires_grad_(True)
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
        self.train(self.training)  # parts with trainable weights now follow the train/eval mode

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
