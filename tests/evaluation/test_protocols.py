"""Evaluation protocols (``tadm evaluate --protocol``): each one's PSNR-Y / SSIM-Y against a reference on real
photos, to 1e-4 dB and 1e-5.

The references are written here in numpy, line by line after the libraries' own code (pyiqa 0.1.16:
``archs/psnr_arch.py``, ``archs/ssim_arch.py``, ``utils/color_util.py``, ``matlab_utils/functions.py``;
BasicSR master: ``metrics/psnr_ssim.py``, ``metrics/metric_util.py``, ``utils/color_util.py``), including
where they work in float32; they share no code with :mod:`tadm.evaluation.protocols` (float64 torch, a
separable window). Where pyiqa itself can be imported (``make test-pyiqa`` installs it beside .venv,
without its ~40 dependencies), the protocol is also checked against ``pyiqa.create_metric`` called exactly
as the TADM authors' ``evaluate_img.py`` calls it. The last tests show the bounds can fail: the conventions
the protocols encode (border crop, Y rounding, clipping, the Y conversion) each move the numbers by far more.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from tadm.datamodules.image_io import load_image
from tadm.evaluation.protocols import PROTOCOLS, get_protocol
from tadm.ops.images import bicubic_resize
from tests.helpers import SAMPLES

PSNR_TOL = 1e-4  # dB
SSIM_TOL = 1e-5


HELDOUT = "brick camera cell china.jpg china_sky china_trees coins flower.jpg flower_bokeh grace_hopper.jpg gravel moon"


def _photos() -> list[Path]:
    """The two validation photos and twelve held-out ones, by name (a photo added later changes nothing here)."""
    heldout = [SAMPLES / "heldout" / (n if "." in n else f"{n}.png") for n in HELDOUT.split()]
    return [SAMPLES / "val" / "chelsea.png", SAMPLES / "val" / "coffee.png", *heldout]


@pytest.fixture(scope="module")
def cases(one_thread: None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, degraded, original) pairs in [-1, 1]: the two validation photos through a bicubic x4 round trip
    and with Gaussian noise (sigma 6.4 levels), then the 12 held-out photos, one degradation each in turn
    (the protocols round both sides to 8 bits)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, path in enumerate(_photos()):
        x = load_image(path)[None]
        h, w = (s - s % 4 for s in x.shape[-2:])
        x = x[..., :h, :w]
        if i < 2 or i % 2 == 0:
            bicubic = bicubic_resize(bicubic_resize(x, (h // 4, w // 4)), (h, w))
            out.append((f"{path.name} bicubic x4", bicubic, x))
        if i < 2 or i % 2 == 1:
            noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
            out.append((f"{path.name} noise", noisy, x))
    assert len(out) == 16
    return out


# ---------------------------------------------------------------------------------------------- references


def _levels(x: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) in [-1, 1] -> (H, W, 3) uint8 RGB, what the image file holds."""
    return ((x[0].clamp(-1, 1) + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def _correlate_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """2D correlation over the 'valid' region (no padding), the direct sum over the window."""
    k = window.shape[0]
    h, w = img.shape[0] - k + 1, img.shape[1] - k + 1
    out = np.zeros((h, w))
    for i in range(k):
        for j in range(k):
            out += window[i, j] * img[i : i + h, j : j + w]
    return out


def _ssim_map(a: np.ndarray, b: np.ndarray, window: np.ndarray, relu: bool) -> np.ndarray:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _correlate_valid(a, window), _correlate_valid(b, window)
    s11 = _correlate_valid(a * a, window) - mu1**2
    s22 = _correlate_valid(b * b, window) - mu2**2
    s12 = _correlate_valid(a * b, window) - mu1 * mu2
    cs = (2 * s12 + c2) / (s11 + s22 + c2)
    if relu:
        cs = np.maximum(cs, 0)
    return (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1) * cs


def _pyiqa_y(rgb: np.ndarray, weights: tuple[float, float, float] = (65.481, 128.553, 24.966), bias=16.0):
    """pyiqa's ``rgb2ycbcr(x)[:, 0]``: float32 image in [0, 1] times the BT.601 row, plus 16, over 255."""
    x = rgb.astype(np.float32) / np.float32(255)
    return (x @ np.asarray(weights, np.float32) + np.float32(bias)) / np.float32(255)


def pyiqa_psnr(pred: torch.Tensor, target: torch.Tensor, **y_kwargs) -> float:
    """``pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr")``: data range 1, eps 1e-8."""
    a, b = _pyiqa_y(_levels(pred), **y_kwargs), _pyiqa_y(_levels(target), **y_kwargs)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(1.0 / (mse + 1e-8)))


def _fspecial_gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """MATLAB's ``fspecial('gaussian')`` as pyiqa builds it (then stored as float32)."""
    m = (size - 1) / 2
    y, x = np.ogrid[-m : m + 1, -m : m + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return (h / h.sum()).astype(np.float32).astype(np.float64)


def pyiqa_ssim(pred: torch.Tensor, target: torch.Tensor, round_y: bool = True, relu: bool = True) -> float:
    """``pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr")``: Y times 255, rounded,
    float64, 'valid' Gaussian filtering, the contrast term through a ReLU, no downsampling."""
    a, b = (_pyiqa_y(_levels(x)) * np.float32(255) for x in (pred, target))
    if round_y:
        a, b = np.round(a), np.round(b)
    return float(_ssim_map(a.astype(np.float64), b.astype(np.float64), _fspecial_gaussian(), relu).mean())


def _basicsr_y(pred: torch.Tensor, crop: int) -> np.ndarray:
    """BasicSR: a BGR uint8 image (as cv2 reads it), cast to float64, cropped, then ``to_y_channel``:
    float32 / 255, ``bgr2ycbcr(y_only=True)`` (dot with [24.966, 128.553, 65.481] + 16, / 255, float32),
    times 255; the metric casts to float64."""
    img = _levels(pred)[..., ::-1].astype(np.float64)
    if crop:
        img = img[crop:-crop, crop:-crop, ...]
    img = img.astype(np.float32) / 255.0
    y = (np.dot(img, [24.966, 128.553, 65.481]) + 16.0) / 255.0
    return (y.astype(np.float32) * 255.0).astype(np.float64)


def basicsr_psnr(pred: torch.Tensor, target: torch.Tensor, crop: int) -> float:
    """``calculate_psnr(img, img2, crop_border=crop, test_y_channel=True)``."""
    mse = np.mean((_basicsr_y(pred, crop) - _basicsr_y(target, crop)) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def _cv2_gaussian_kernel(n: int = 11, sigma: float = 1.5) -> np.ndarray:
    """``cv2.getGaussianKernel(n, sigma)`` (float64) for sigma > 0."""
    x = np.arange(n) - (n - 1) * 0.5
    k = np.exp(-0.5 / sigma**2 * x * x)
    return (k / k.sum())[:, None]


def basicsr_ssim(pred: torch.Tensor, target: torch.Tensor, crop: int) -> float:
    """``calculate_ssim(img, img2, crop_border=crop, test_y_channel=True)``: ``_ssim`` with
    ``cv2.filter2D(img, -1, outer(k, k))[5:-5, 5:-5]`` (the valid region), no clipping."""
    k = _cv2_gaussian_kernel()
    window = np.outer(k, k.transpose())
    return float(_ssim_map(_basicsr_y(pred, crop), _basicsr_y(target, crop), window, relu=False).mean())


def tadm_reference(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """torchmetrics' PSNR / SSIM (defaults: Gaussian 11, sigma 1.5, reflect-padded) on the unrounded BT.601 Y
    in [16/255, 235/255], in float64."""
    y = [
        torch.from_numpy(
            _levels(x).astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255**2 + 16 / 255
        )
        for x in (pred, target)
    ]
    p, t = (v[None, None] for v in y)
    return float(peak_signal_noise_ratio(p, t, data_range=1.0)), float(
        structural_similarity_index_measure(p, t, data_range=1.0)
    )


# ---------------------------------------------------------------------------------------------- agreement


def _check(protocol: str, scale: int, cases, reference, ssim_tol: float = SSIM_TOL) -> None:
    p = get_protocol(protocol, scale)
    worst = [0.0, 0.0]
    for name, pred, target in cases:
        psnr, ssim = float(p.psnr_y(pred, target)[0]), float(p.ssim_y(pred, target)[0])
        ref_psnr, ref_ssim = reference(pred, target)
        assert abs(psnr - ref_psnr) < PSNR_TOL, (name, psnr, ref_psnr)
        assert abs(ssim - ref_ssim) < ssim_tol, (name, ssim, ref_ssim)
        worst = [max(worst[0], abs(psnr - ref_psnr)), max(worst[1], abs(ssim - ref_ssim))]
    print(f"{protocol} x{scale}: worst |dPSNR| {worst[0]:.1e} dB, |dSSIM| {worst[1]:.1e}, {len(cases)} pairs")


def test_pyiqa_protocol_equals_the_pyiqa_reference_on_real_photos(cases) -> None:
    _check("pyiqa", 16, cases, lambda p, t: (pyiqa_psnr(p, t), pyiqa_ssim(p, t)))


def test_basicsr_protocol_equals_the_basicsr_reference_with_the_scale_as_border(cases) -> None:
    _check("basicsr", 4, cases, lambda p, t: (basicsr_psnr(p, t, 4), basicsr_ssim(p, t, 4)))
    _check("basicsr", 16, cases[:4], lambda p, t: (basicsr_psnr(p, t, 16), basicsr_ssim(p, t, 16)))


def test_tadm_protocol_is_the_unchanged_default(cases) -> None:
    """tadm's own metrics (torchmetrics in float32, unchanged) against the same formulas in float64: PSNR to
    1e-4 dB, SSIM to 1e-4 only (float32 rounding moves it by up to 3.4e-5 on these photos)."""
    _check("tadm", 16, cases[::2], tadm_reference, ssim_tol=1e-4)


def test_pyiqa_protocol_equals_pyiqa_itself(cases) -> None:
    """pyiqa's own functions, called as the TADM authors' evaluate_img.py does (needs pyiqa: ``make test-pyiqa``)."""
    pyiqa = pytest.importorskip("pyiqa", reason="pyiqa is not installed (`make test-pyiqa` adds it)")
    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    ssim = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")

    def unit(x: torch.Tensor) -> torch.Tensor:  # what util_image.imread(..., dtype="float32") gives
        return torch.from_numpy(_levels(x)).permute(2, 0, 1)[None].float() / 255

    def reference(p: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
        return float(psnr(unit(p), unit(t))), float(ssim(unit(p), unit(t)))

    _check("pyiqa", 16, cases, reference)


# ---------------------------------------------------------------------------------------------- the bounds bite


@pytest.mark.slow  # ~14 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_each_convention_moves_the_numbers_past_the_bounds(cases) -> None:
    """What each protocol encodes matters: leaving any one detail out fails the bounds above on these photos."""
    pyiqa, tadm = get_protocol("pyiqa"), get_protocol("tadm")
    basicsr = {s: get_protocol("basicsr", s) for s in (0, 4, 16)}
    crop_psnr, crop_ssim, rounding, relu, yiq, tadm_ssim = [], [], [], [], [], []
    for _, pred, target in cases:
        b = {s: (float(p.psnr_y(pred, target)), float(p.ssim_y(pred, target))) for s, p in basicsr.items()}
        crop_psnr.append(max(abs(b[4][0] - b[0][0]), abs(b[16][0] - b[0][0])))
        crop_ssim.append(max(abs(b[4][1] - b[0][1]), abs(b[16][1] - b[0][1])))
        mine = float(pyiqa.ssim_y(pred, target)[0])
        tadm_ssim.append(abs(float(tadm.ssim_y(pred, target)[0]) - mine))
        # pyiqa's own default colour space for `psnry` is YIQ: Y = 0.299 R + 0.587 G + 0.114 B, full range
        full_range = pyiqa_psnr(pred, target, weights=(76.245, 149.685, 29.07), bias=0.0)
        yiq.append(abs(float(pyiqa.psnr_y(pred, target)[0]) - full_range))
    for _, pred, target in cases[:4]:  # the numpy SSIM is slow: the two validation photos
        mine = float(pyiqa.ssim_y(pred, target)[0])
        rounding.append(abs(mine - pyiqa_ssim(pred, target, round_y=False)))
        relu.append(abs(mine - pyiqa_ssim(pred, target, relu=False)))
    assert min(crop_psnr) > 5 * PSNR_TOL and max(crop_psnr) > 1.0  # basicsr's border crop
    assert statistics.median(crop_ssim) > 10 * SSIM_TOL and max(crop_ssim) > 100 * SSIM_TOL
    assert min(yiq) > 1.0  # 20 log10(255 / 219) = 1.32 dB below 40 dB: a wrong Y fails by 10^4 x the bound
    assert min(rounding) > 10 * SSIM_TOL  # pyiqa's SSIM rounds Y to integer levels
    assert max(relu) > SSIM_TOL  # ... and clips the contrast term at 0 (it matters on bicubic blur)
    assert max(tadm_ssim) > 100 * SSIM_TOL  # tadm's SSIM (reflect-padded borders, unrounded Y) is not pyiqa's


def test_protocols_by_name_and_small_images() -> None:
    assert PROTOCOLS == ("tadm", "pyiqa", "basicsr")
    assert get_protocol("basicsr", 32).crop_border == 32 and get_protocol("pyiqa").crop_border == 0
    with pytest.raises(ValueError, match="unknown protocol 'matlab'"):
        get_protocol("matlab")
    with pytest.raises(ValueError, match="give the scale"):
        get_protocol("basicsr")
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert get_protocol("basicsr", 16).psnr_y(x, x.clone())[0] == math.inf
    assert get_protocol("pyiqa").psnr_y(x, x.clone())[0] == pytest.approx(80.0)  # eps 1e-8: 80 dB, not inf
    assert float(get_protocol("pyiqa").ssim_y(x, x.clone())[0]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"11x11 px \(after cutting 16 px per side, the image is 8x8\)"):
        get_protocol("basicsr", 16).ssim_y(x, x)
    with pytest.raises(ValueError, match="keeps nothing"):
        get_protocol("basicsr", 20).psnr_y(x, x)
