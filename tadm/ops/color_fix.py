"""Colour correction of a reconstruction against a reference image of the same size (the bicubic upscale
of its LR image): ``none``, ``adain`` or ``wavelet``.

- ``adain``: each channel of the image is shifted and scaled so that its mean and standard deviation over the
  whole image are the reference's.
- ``wavelet`` (as StableSR's ``wavelet_reconstruction``): the image's high frequencies plus the reference's
  low frequencies. The low-pass is five 3x3 binomial blurs ([1, 2, 1] / 4 in each direction) dilated 1, 2, 4,
  8 and 16 px, each over a replicate-padded border; the high-pass is the image minus its low-pass. The
  low-pass is linear, so ``high(x) + low(ref) = x + low(ref - x)``: one difference image is blurred, channel by
  channel, as shifted sums: besides the output, about one image of memory (4096x4096 px: +261 MiB
  peak, 3 s on one CPU thread).

Both run in float32 on whole images (statistics and blurs see the full image, so tiled inference applies them
once, after the tiles are blended) and return float32 clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

ColorFix = Literal["none", "wavelet", "adain"]
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)
#: dilated blur levels of the wavelet low-pass (StableSR's): radii 1, 2, 4, 8, 16 px
WAVELET_LEVELS = 5
#: a channel flatter than this (in [-1, 1] units) is only shifted by ``adain``, not scaled
MIN_STD = 1e-4


def check_color_fix(name: str) -> ColorFix:
    """``name`` if it is a colour fix, else a ValueError listing them."""
    if name not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {name!r}; choose one of {list(COLOR_FIXES)}")
    return name  # type: ignore[return-value]


def wavelet_low_pass(x: Tensor, levels: int = WAVELET_LEVELS) -> Tensor:
    """The low frequencies of ``x`` (B, C, H, W): ``levels`` binomial 3x3 blurs dilated 1, 2, 4, ... px over
    replicate-padded borders, each channel on its own (StableSR's ``wavelet_blur`` repeated).

    The 3x3 kernel is separable and so is replicate padding: each blur is a dilated [1, 2, 1] / 4 along the
    rows, then along the columns, as shifted sums (an im2col convolution would need 9 copies of the image).
    """
    for i in range(levels):
        r = 2**i
        x = _binomial_1d(_binomial_1d(x, r, -1), r, -2)
    return x


def _binomial_1d(x: Tensor, r: int, dim: int) -> Tensor:
    """[1, 2, 1] / 4 dilated by ``r`` along ``dim``, the border replicated."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = r
    p = torch.cat([first.repeat(reps), x, last.repeat(reps)], dim=dim)
    out = p.narrow(dim, 0, n).add(p.narrow(dim, r, n), alpha=2.0)
    return out.add_(p.narrow(dim, 2 * r, n)).mul_(0.25)


def wavelet_color_fix(image: Tensor, reference: Tensor, levels: int = WAVELET_LEVELS) -> Tensor:
    """``image - low(image) + low(reference)``, computed as ``image + low(reference - image)`` per channel."""
    x = image.float()
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        xc = x[:, c : c + 1]
        diff = reference[:, c : c + 1].float() - xc
        out[:, c : c + 1] = xc + wavelet_low_pass(diff, levels)
    return out.clamp_(-1.0, 1.0)


def adain_color_fix(image: Tensor, reference: Tensor) -> Tensor:
    """Each channel of ``image`` scaled and shifted to the per-channel mean and std of ``reference`` (per
    sample, over the whole image; population std)."""
    x = image.float()
    ref = reference.float()
    std_x, mean_x = torch.std_mean(x, dim=(-2, -1), keepdim=True, correction=0)
    std_r, mean_r = torch.std_mean(ref, dim=(-2, -1), keepdim=True, correction=0)
    gain = torch.where(std_x > MIN_STD, std_r / std_x.clamp_min(MIN_STD), torch.ones_like(std_x))
    return ((x - mean_x) * gain + mean_r).clamp_(-1.0, 1.0)


def apply_color_fix(image: Tensor, reference: Tensor, method: str) -> Tensor:
    """``image`` (B, 3, H, W) in [-1, 1] corrected towards ``reference`` (same shape) by ``method``;
    ``none`` returns ``image`` itself."""
    method = check_color_fix(method)
    if method == "none":
        return image
    if reference.shape != image.shape:
        raise ValueError(
            f"colour reference has shape {tuple(reference.shape)}, the image {tuple(image.shape)}"
        )
    if method == "adain":
        return adain_color_fix(image, reference)
    return wavelet_color_fix(image, reference)
