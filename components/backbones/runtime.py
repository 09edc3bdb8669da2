"""What the Stable Diffusion (UNet) and the SD 3 / FLUX (DiT) backbone runtimes share.

Both compose frozen diffusers parts, loaded per stage under the part names ``vae``, ``unet`` (the
denoiser: the UNet or the transformer, with its noise schedule) and ``text`` (the empty-prompt
embedding); both add LoRA on the denoiser and the VAE decoder for the enhancer stages
(:mod:`tadm.components.backbones.lora`) and keep every fully frozen part in eval mode; and both map
images to scaled latents z = (E(x) - shift_factor) * scaling_factor, decoded by D(z / scaling_factor +
shift_factor). The Stable Diffusion VAEs are the shift-0 case. :class:`FrozenPartsRuntime` holds that
once; what differs (how parts are loaded, the denoiser call, which modules get LoRA) stays in
:mod:`~tadm.components.backbones.stable_diffusion` and :mod:`~tadm.components.backbones.dit`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

#: the parts :meth:`DiffusionBackbone.load` takes, in the order they are loaded
PARTS = ("vae", "unet", "text")


class FrozenPartsRuntime:
    """Mixin placed before :class:`~tadm.contracts.DiffusionBackbone` in a backbone's bases.

    The backbone provides ``vae``, ``preset`` (``latent_channels``, ``downsample_factor``,
    ``scaling_factor``, ``shift_factor``: the values reported until the VAE is loaded), ``sample_latent``,
    ``prompt_embeds``, ``_lora_stage`` (None until LoRA is added), ``_denoiser``, ``_part_modules()``
    and ``_add_lora()``.
    """

    vae: nn.Module | None
    preset: Any
    sample_latent: bool
    prompt_embeds: Tensor | None
    _lora_stage: str | None
    backbone_id: str

    # --- what the backbone supplies ------------------------------------------------------------
    @property
    def _denoiser(self) -> nn.Module | None:
        """The loaded diffusion model (part ``unet``): the UNet or the transformer."""
        raise NotImplementedError

    def _part_modules(self) -> tuple[nn.Module | None, ...]:
        """Every module this backbone may hold; the fully frozen ones stay in eval mode."""
        raise NotImplementedError

    def _add_lora(self) -> None:
        """LoRA on the denoiser and the VAE decoder; nothing else trains."""
        raise NotImplementedError

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
        super().load_for_stage(stage)  # type: ignore[misc]
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
        super().train(mode)  # type: ignore[misc]
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
