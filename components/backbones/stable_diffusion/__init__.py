"""The UNet Stable Diffusion family (SD 1.5, 2.1, 2.1-base, SDXL): ``unet_backbone`` (the registered
backbone), ``unet_presets`` (named variants), ``unet_weight_loading`` (SD's module classes and single-file
layout over the shared diffusers loader)."""

from tadm.components.backbones.diffusers_base.lora_adapters import VAE_ADAPTER
from tadm.components.backbones.stable_diffusion.unet_backbone import UNET_ADAPTER, StableDiffusionBackbone

__all__ = ["UNET_ADAPTER", "VAE_ADAPTER", "StableDiffusionBackbone"]
