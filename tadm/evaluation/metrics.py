"""Fidelity metrics on the Y channel (YCbCr, BT.601), as super-resolution papers report them.

Both images are taken from [-1, 1] to [0, 1] and rounded to 8 bits first (what a saved PNG
holds), then converted to Y in [16/255, 235/255]. PSNR/SSIM come from torchmetrics; no border is
cropped. torchmetrics is imported where it is called: it takes ~4 s to import (scipy, its plotting), and
``tadm evaluate --help`` reaches this module for the protocol names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tadm.ops.images import quantize_unit_8bit, to_unit

_Y_WEIGHTS = torch.tensor([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(x01: Tensor) -> Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,1,H,W) luma Y in [16/255, 235/255] (ITU-R BT.601)."""
    w = _Y_WEIGHTS.to(x01.device, x01.dtype).view(1, 3, 1, 1)
    return (x01 * w).sum(dim=1, keepdim=True) + 16.0 / 255.0


def _y(x: Tensor) -> Tensor:
    return rgb_to_y(quantize_unit_8bit(to_unit(x.float())))


def psnr_y(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (dB) on Y; images in [-1, 1]. Identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    p, t = _y(pred), _y(target)
    return torch.stack([peak_signal_noise_ratio(p[i], t[i], data_range=1.0) for i in range(p.shape[0])])


def ssim_y(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM on Y (Gaussian window 11, sigma 1.5); images in [-1, 1].

    Images smaller than the window get the largest odd window that fits (sigma scaled alike), down
    to 1x1 where SSIM reduces to its luminance term: tiny images get a defined score, not an error.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t = _y(pred), _y(target)
    k = min(11, min(p.shape[-2:]))
    k -= 1 - k % 2
    return structural_similarity_index_measure(
        p, t, data_range=1.0, reduction="none", kernel_size=k, sigma=1.5 * k / 11
    )


def psnr_rgb(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR over RGB in [0,1] (used for the LR image against bicubic)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    p, t = to_unit(pred.float()), to_unit(target.float())
    return torch.stack([peak_signal_noise_ratio(p[i], t[i], data_range=1.0) for i in range(p.shape[0])])
