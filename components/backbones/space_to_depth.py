"""A weight-free, exactly invertible "autoencoder": 8x8 space-to-depth.

It is the embedded default for the quickstart and for tests: no download, no parameters, and
decode(encode(x)) == x, so every decibel the round trip loses is the rescaler's doing. Its latent
has 3*8*8 = 192 channels at H/8 (the SD VAE's spatial layout with more channels), which also
exercises the rescalers' configurable latent width. It has no UNet: it serves stage 1 only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor

from tadm.contracts import BACKBONES, DiffusionBackbone


@BACKBONES.register("space_to_depth")
class SpaceToDepthBackbone(DiffusionBackbone):
    """Weight-free lossless 8x8 space-to-depth latent (192 channels); stage 1 only, no UNet."""

    def __init__(self, factor: int = 8, scaling_factor: float = 1.0) -> None:
        """
        Args:
            factor: spatial downsampling of the latent (8 matches the SD VAE layout).
            scaling_factor: multiplier applied to the latent (kept for symmetry with SD VAEs).
        """
        super().__init__()
        self.downsample_factor = factor
        self.latent_channels = 3 * factor * factor
        self.scaling_factor = scaling_factor

    @property
    def backbone_id(self) -> str:
        return f"space_to_depth:{self.downsample_factor}"

    def load(self, parts: Iterable[str]) -> None:
        missing = set(parts) - {"vae"}
        if missing:
            raise ValueError(
                f"the space_to_depth backbone has only an autoencoder; it cannot provide {sorted(missing)}. "
                "Stages 'enhancer' and 'joint' need a diffusion backbone such as stable_diffusion."
            )

    def encode(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"image size {h}x{w} is not a multiple of {self.downsample_factor}")
        return F.pixel_unshuffle(x, self.downsample_factor) * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z / self.scaling_factor, self.downsample_factor).clamp(-1.0, 1.0)
