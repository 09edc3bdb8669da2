"""Rescalers: HR image (+ latent) -> 8-bit LR image -> reconstruction. Every module here is
imported by ``tadm.registry.load_plugins`` so its ``@RESCALERS.register`` runs."""

from components.rescalers.base import Rescaler

__all__ = ["Rescaler"]
