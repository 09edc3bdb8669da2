"""Timestep aligners: choose the one-step diffusion timestep from the reconstructed latent.
Every module here is imported by ``tadm.registry.load_plugins``."""

from components.aligners.base import TimestepAligner

__all__ = ["TimestepAligner"]
