"""The HR -> LR -> HR round trip, shared by validation, evaluation and (later) the codec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from components.backbones.base import DiffusionBackbone
from components.rescalers.base import Rescaler
from tadm.imageops import crop_to, lcm, pad_to_multiple


@dataclass
class RoundTrip:
    """LR image (of the padded HR image) and the reconstruction cropped to the input size."""

    lr: Tensor
    reconstruction: Tensor
    padded_size: tuple[int, int]


def pad_multiple(backbone: DiffusionBackbone, rescaler: Rescaler) -> int:
    """HR sizes must be multiples of both the scale and the latent downsampling."""
    return lcm(rescaler.scale, backbone.downsample_factor)


def downscale(backbone: DiffusionBackbone, rescaler: Rescaler, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """HR image of any size -> LR image of the reflect-padded HR image; returns the LR and the
    original (H, W) needed to crop the reconstruction back."""
    xp, size = pad_to_multiple(x, pad_multiple(backbone, rescaler))
    z = backbone.encode(xp) if rescaler.space == "latent" else None
    return rescaler.downscale(xp, z), size


Enhance = Callable[[Tensor], Tensor]


def upscale(
    backbone: DiffusionBackbone,
    rescaler: Rescaler,
    y: Tensor,
    size: tuple[int, int],
    enhance: Enhance | None = None,
) -> Tensor:
    """LR image -> HR image in [-1, 1] cropped to ``size``; ``enhance`` maps z_hat to z0_hat
    (the one-step diffusion of stages 2/3) for latent rescalers."""
    out = rescaler.upscale(y)
    if enhance is not None and rescaler.space == "latent":
        out = enhance(out)
    x_hat = backbone.decode(out) if rescaler.space == "latent" else out.clamp(-1.0, 1.0)
    return crop_to(x_hat, size)


@torch.no_grad()
def round_trip(
    backbone: DiffusionBackbone, rescaler: Rescaler, x: Tensor, enhance: Enhance | None = None
) -> RoundTrip:
    y, size = downscale(backbone, rescaler, x)
    x_hat = upscale(backbone, rescaler, y, size, enhance)
    s = rescaler.scale
    return RoundTrip(lr=y, reconstruction=x_hat, padded_size=(y.shape[-2] * s, y.shape[-1] * s))
