"""Evaluation protocols: *how* PSNR-Y and SSIM-Y are computed (``tadm evaluate --protocol NAME``).

Papers on image rescaling report "PSNR-Y / SSIM-Y" under different conventions, and the conventions move the
numbers by more than the gaps between methods. A protocol names one convention; the report records it.

- ``tadm`` (the default): :mod:`tadm.evaluation.metrics`, i.e. torchmetrics' PSNR and SSIM (Gaussian 11,
  sigma 1.5, borders reflect-padded) on Y in [16/255, 235/255] (BT.601), not rounded; the full image.
- ``pyiqa``: pyiqa's ``psnr`` and ``ssim`` with ``test_y_channel=True, color_space="ycbcr"``, which is what
  the TADM authors' evaluation scripts call (``evaluate_img.py``; also ``lpips-vgg``, ``dists``, ``fid``).
  PSNR on Y in [16/255, 235/255], not rounded, ``10 log10(1 / (MSE + 1e-8))`` (so identical images give
  80 dB, not inf); SSIM on Y rounded to integer levels in [16, 235], Gaussian 11 / sigma 1.5 over the
  'valid' region (no padding), constants for data range 255, the contrast-structure term clipped at 0.
  No border crop.
- ``basicsr``: BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``crop_border = scale`` and
  ``test_y_channel=True`` (the convention of IRN and the rescaling papers that compare with it): ``scale``
  pixels cut from every side of the RGB image first, then Y in [16, 235] not rounded,
  ``10 log10(255^2 / MSE)`` (inf for identical images), and the MATLAB-style SSIM of Wang et al. (Gaussian
  11 / sigma 1.5, 'valid' region, no clipping).

In all three, both images are 8-bit first (what a saved PNG holds), and Y is ITU-R BT.601's
``16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1]. The ``pyiqa`` and ``basicsr``
protocols are this module's own implementation of those libraries' formulas: Y from the integer 8-bit
levels, everything in float64 (the libraries work partly in float32; ``tests/evaluation/test_protocols.py`` measures
the agreement with independent references and with pyiqa itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.evaluation import metrics
from tadm.ops.images import quantize_unit_8bit, to_unit

PROTOCOLS = ("tadm", "pyiqa", "basicsr")

#: SSIM's window, as in Wang et al.'s MATLAB code and both libraries
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: pyiqa's PSNR adds this to the MSE of images in [0, 1]
PYIQA_PSNR_EPS = 1e-8


class Protocol:
    """A way of computing PSNR-Y and SSIM-Y; ``psnr_y`` / ``ssim_y`` take (B, 3, H, W) in [-1, 1] and
    return (B,) float64 values (one per image)."""

    name = ""
    crop_border = 0

    def psnr_y(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def ssim_y(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """One Markdown sentence for ``summary.md``."""
        raise NotImplementedError

    def caveats(self) -> list[str]:
        """Where the rest of the report (LPIPS, DISTS, FID, KID) is not the protocol's own library's."""
        return []

    def as_dict(self) -> dict[str, object]:
        """The facts ``summary.json`` records, so runs of different protocols can be told apart."""
        return {"name": self.name, "crop_border": self.crop_border, "description": self.describe()}


class TadmProtocol(Protocol):
    """tadm's default (:mod:`tadm.evaluation.metrics`, unchanged): torchmetrics on the unrounded Y."""

    name = "tadm"

    def psnr_y(self, pred: Tensor, target: Tensor) -> Tensor:
        return metrics.psnr_y(pred, target).double()

    def ssim_y(self, pred: Tensor, target: Tensor) -> Tensor:
        return metrics.ssim_y(pred, target).double()

    def describe(self) -> str:
        return (
            "Protocol `tadm`: PSNR-Y/SSIM-Y by torchmetrics on Y in [16/255, 235/255] (BT.601) of the 8-bit "
            "images, not rounded; the full image, no border crop; SSIM Gaussian 11 / sigma 1.5 with "
            "reflect-padded borders; identical images give PSNR inf."
        )


class PyiqaProtocol(Protocol):
    """pyiqa's ``psnr`` / ``ssim`` with ``test_y_channel=True, color_space="ycbcr"`` (the TADM release's)."""

    name = "pyiqa"

    def psnr_y(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = y_levels(pred) / 255.0, y_levels(target) / 255.0
        mse = (p - t).square().mean(dim=(1, 2, 3))
        return 10.0 * torch.log10(1.0 / (mse + PYIQA_PSNR_EPS))

    def ssim_y(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = y_levels(pred).round(), y_levels(target).round()  # pyiqa rounds Y to integer levels
        _check_window_fits(p, self.name, 0)
        return ssim_valid(p, t, data_range=255.0, clip_contrast=True)

    def describe(self) -> str:
        return (
            "Protocol `pyiqa`: pyiqa's `psnr`/`ssim` with `test_y_channel=True, color_space='ycbcr'` (as in the "
            "TADM authors' evaluation): Y (BT.601) of the 8-bit images; PSNR on Y in [16/255, 235/255], not "
            "rounded, 10 log10(1 / (MSE + 1e-8)) (identical images: 80 dB); SSIM on Y rounded to integer "
            "levels, Gaussian 11 / sigma 1.5 over the valid region, contrast term clipped at 0; the full "
            "image, no border crop."
        )

    def caveats(self) -> list[str]:
        return [
            "Under `pyiqa`, LPIPS (the `lpips` package, VGG, v0.1) and DISTS (torchmetrics) follow the same "
            "definitions as pyiqa's `lpips-vgg` and `dists` but are not pyiqa's code (not compared numerically: "
            "no weights offline); FID uses the same Inception weights as pyiqa's `fid` but torch-fidelity's "
            "resize to 299 px, where pyiqa's (clean-fid's 'clean' mode) resizes with PIL bicubic first, so "
            "FIDs differ a little; pyiqa (0.1.16) offers no KID metric.",
        ]


class BasicsrProtocol(Protocol):
    """BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``crop_border = scale``, ``test_y_channel``."""

    name = "basicsr"

    def __init__(self, scale: int) -> None:
        if scale < 0:
            raise ValueError(f"the border crop must be >= 0, got {scale}")
        self.crop_border = int(scale)

    def psnr_y(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = self._cropped_y(pred), self._cropped_y(target)
        mse = (p - t).square().mean(dim=(1, 2, 3))
        return torch.where(mse == 0, math.inf, 10.0 * torch.log10(255.0**2 / mse))

    def ssim_y(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = self._cropped_y(pred), self._cropped_y(target)
        _check_window_fits(p, self.name, self.crop_border)
        return ssim_valid(p, t, data_range=255.0, clip_contrast=False)

    def _cropped_y(self, x: Tensor) -> Tensor:
        c = self.crop_border
        h, w = x.shape[-2:]
        if min(h, w) <= 2 * c:
            raise ValueError(
                f"protocol basicsr crops {c} px from every side (the scale) and a {h}x{w} image keeps nothing"
            )
        return y_levels(x[..., c : h - c, c : w - c])

    def describe(self) -> str:
        c = self.crop_border
        return (
            f"Protocol `basicsr`: BasicSR's `calculate_psnr`/`calculate_ssim` with `crop_border={c}` (the "
            f"scale) and `test_y_channel=True` (as IRN reports): {c} px cut from every side of the 8-bit "
            "images, then Y (BT.601) in [16, 235], not rounded; PSNR 10 log10(255^2 / MSE) (identical images: "
            "inf); MATLAB-style SSIM, Gaussian 11 / sigma 1.5 over the valid region."
        )


def get_protocol(name: str, scale: int | None = None) -> Protocol:
    """The protocol called ``name``; ``basicsr`` needs the ``scale`` (its border crop)."""
    if name == "tadm":
        return TadmProtocol()
    if name == "pyiqa":
        return PyiqaProtocol()
    if name == "basicsr":
        if scale is None:
            raise ValueError("protocol basicsr crops `scale` px per side: give the scale")
        return BasicsrProtocol(scale)
    raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")


def rgb_levels(x: Tensor) -> Tensor:
    """(B,3,H,W) in [-1, 1] -> the 8-bit levels 0..255 (float64 integers) a saved PNG would hold."""
    return (quantize_unit_8bit(to_unit(x.float())) * 255.0).round().double()


def y_levels(x: Tensor) -> Tensor:
    """(B,3,H,W) in [-1, 1] -> (B,1,H,W) BT.601 Y in [16, 235], float64, not rounded.

    ``16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1], i.e. ``16 + (65481 r + 128553 g +
    24966 b) / 255000`` for 8-bit levels r, g, b: the weighted sum is an exact integer in float64, so Y is
    the correctly rounded value and an exact half level stays exactly half (rounded to even later).
    """
    q = rgb_levels(x)
    s = 65481.0 * q[:, 0:1] + 128553.0 * q[:, 1:2] + 24966.0 * q[:, 2:3]
    return s / 255000.0 + 16.0


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1D Gaussian (float64); its outer product is MATLAB's ``fspecial('gaussian')``."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_valid(x: Tensor, y: Tensor, data_range: float, clip_contrast: bool, band: int = 512) -> Tensor:
    """SSIM of (B,1,H,W) images in [0, data_range] (float64), mean over the 'valid' region of the window.

    Wang et al.'s formula with K1 = 0.01, K2 = 0.03 and the 11x11 Gaussian (sigma 1.5) applied as two 1D
    passes (the window is separable). ``clip_contrast``: clip the contrast-structure term at 0 (pyiqa). Rows
    go in bands of ``band`` output rows, so the float64 maps stay small (a 7680x4320 pair: PSNR and SSIM
    took 1.9 GB above the inputs on a CPU).
    """
    k = SSIM_WINDOW
    rows, cols = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for r in range(0, rows, band):
        end = min(rows, r + band) + k - 1
        total += _ssim_map(x[..., r:end, :], y[..., r:end, :], data_range, clip_contrast).sum(dim=(1, 2))
    return total / (rows * cols)


def _ssim_map(x: Tensor, y: Tensor, data_range: float, clip_contrast: bool) -> Tensor:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = gaussian_window().to(x.device)
    k = g.numel()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5, h, W)
    out = F.conv2d(stack, g.view(1, 1, k, 1).expand(5, 1, k, 1), groups=5)
    out = F.conv2d(out, g.view(1, 1, 1, k).expand(5, 1, 1, k), groups=5)
    mu1, mu2, e11, e22, e12 = out.unbind(dim=1)
    mu11, mu22, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    cs = (2 * (e12 - mu12) + c2) / ((e11 - mu11) + (e22 - mu22) + c2)
    if clip_contrast:
        cs = cs.clamp(min=0)
    return (2 * mu12 + c1) / (mu11 + mu22 + c1) * cs


def _check_window_fits(y: Tensor, name: str, crop: int) -> None:
    h, w = y.shape[-2:]
    if min(h, w) < SSIM_WINDOW:
        what = f"after cutting {crop} px per side, " if crop else ""
        raise ValueError(
            f"protocol {name}'s SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} px ({what}the image is "
            f"{h}x{w}); use --protocol tadm for tiny images"
        )
