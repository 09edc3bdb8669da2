"""Small tensor image helpers shared by rescalers, the pipeline and metrics."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize (MATLAB-``imresize``-like when shrinking), clamped to [-1, 1].

    Antialiasing matters at x16/x32: plain bicubic sampling aliases badly, which would make both
    the baseline and the LR-guidance target unrealistically poor.
    """
    if size[1] == 1 and size[0] > 1:
        # PyTorch 2.14's antialiased bicubic returns the first output row for every row when the output is one
        # pixel wide (CPU); the filter is separable, so resize the transposed image (one pixel tall: right)
        return bicubic_resize(x.transpose(-1, -2), (size[1], size[0])).transpose(-1, -2)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1.0, 1.0)


def bicubic_down(x: Tensor, scale: int) -> Tensor:
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of the scale {scale}")
    return bicubic_resize(x, (h // scale, w // scale))


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad the bottom/right edges up to a multiple; returns the padded tensor and the
    original (H, W) so :func:`crop_to` can undo it. Sizes smaller than the pad fall back to
    repeated reflection so even 1x1 images work."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    out = x
    while ph > 0 or pw > 0:  # reflect padding needs pad < size; repeat for tiny inputs
        sh, sw = min(ph, out.shape[-2] - 1), min(pw, out.shape[-1] - 1)
        if sh == 0 and sw == 0:  # 1-pixel dimension: nothing to reflect, replicate instead
            out = F.pad(out, (0, pw, 0, ph), mode="replicate")
            break
        out = F.pad(out, (0, sw, 0, sh), mode="reflect")
        ph, pw = ph - sh, pw - sw
    return out, (h, w)


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x[..., : size[0], : size[1]]


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x.clamp(-1.0, 1.0) + 1.0) / 2.0


def quantize_unit_8bit(x01: Tensor) -> Tensor:
    """Round an image in [0, 1] to the 256 levels an 8-bit file stores."""
    return (x01.clamp(0.0, 1.0) * 255.0).round() / 255.0
