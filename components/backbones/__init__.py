"""Diffusion backbones: own the VAE (and, for the enhancer, UNet, schedule and text prior).
Every module here is imported by ``tadm.registry.load_plugins``."""

from components.backbones.base import DiffusionBackbone

__all__ = ["DiffusionBackbone"]
