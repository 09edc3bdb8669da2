"""Noise-schedule arithmetic for the one-step enhancer, at CONTINUOUS timesteps.

The TPM predicts a real-valued timestep (e.g. 37.4) and learns through it, so alpha-bar is read
off the discrete training schedule by linear interpolation (differentiable in ``t``), and the
x0 estimate accepts one alpha-bar per sample (B,) or a per-pixel map (B,1,h,w).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: prediction types as diffusers' scheduler configs spell them, plus short aliases
_EPS = ("epsilon", "eps")
_V = ("v_prediction", "v")
_SAMPLE = ("sample",)
PREDICTION_TYPES = _EPS + _V + _SAMPLE


def _float_t(alphas_cumprod: Tensor, t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor on the schedule's device, at least the schedule's precision."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    dtype = (
        torch.promote_types(t.dtype, alphas_cumprod.dtype) if t.is_floating_point() else alphas_cumprod.dtype
    )
    return t.to(device=alphas_cumprod.device, dtype=dtype)


def abar_at(alphas_cumprod: Tensor, t: Tensor | float) -> Tensor:
    """Alpha-bar at continuous timesteps ``t`` (any shape), linear between integer indices.

    ``t`` is clamped to [0, T-1]. Exact at integers; differentiable w.r.t. ``t`` inside the range
    (the TPM learns through it), zero gradient where clamped.
    """
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D schedule of length >= 2, got shape {tuple(alphas_cumprod.shape)}"
        )
    last = alphas_cumprod.numel() - 1
    t = _float_t(alphas_cumprod, t).clamp(0, last)
    lo = t.detach().floor().clamp(max=last - 1).long()
    frac = t - lo.to(t.dtype)  # gradient 1 w.r.t. t
    a = alphas_cumprod.to(t.dtype)
    return a[lo] * (1 - frac) + a[lo + 1] * frac


def _broadcast_abar(abar: Tensor | float, z_t: Tensor) -> Tensor:
    """Shape ``abar`` to broadcast against a latent (B,C,h,w); reject shapes that would mis-broadcast."""
    abar = torch.as_tensor(abar, device=z_t.device)
    if not abar.is_floating_point():
        abar = abar.float()
    b, _, h, w = z_t.shape
    if abar.ndim == 0:
        return abar
    if abar.ndim == 1:
        if abar.shape[0] not in (1, b):
            raise ValueError(f"abar has {abar.shape[0]} values but the latent batch is {b}")
        return abar.view(-1, 1, 1, 1)
    if abar.ndim == 4:
        if abar.shape[0] not in (1, b) or abar.shape[1] != 1 or tuple(abar.shape[2:]) not in ((h, w), (1, 1)):
            raise ValueError(
                f"an abar map must be (B,1,h,w) matching the latent's batch and size {(b, 1, h, w)}, "
                f"got {tuple(abar.shape)}"
            )
        return abar
    raise ValueError(f"abar must be a scalar, (B,) or (B,1,h,w); got shape {tuple(abar.shape)}")


def x0_from_output(z_t: Tensor, model_output: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """One-step clean-latent estimate from the model output (DDPM ``pred_original_sample``).

    Args:
        z_t: the noisy latent (B,C,h,w) the model saw.
        model_output: the model's prediction, same shape.
        abar: alpha-bar as a scalar, (B,) or a (B,1,h,w) map at the latent's size.
        prediction_type: ``epsilon``/``eps``, ``v_prediction``/``v`` or ``sample`` (read it from
            the scheduler config, never guess).

    No clipping or thresholding: latents are unbounded.
    """
    if z_t.ndim != 4 or model_output.shape != z_t.shape:
        raise ValueError(
            f"z_t and model_output must be (B,C,h,w) of equal shape, got {tuple(z_t.shape)} and "
            f"{tuple(model_output.shape)}"
        )
    if prediction_type in _SAMPLE:
        return model_output
    if prediction_type not in _EPS + _V:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}"
        )
    abar = _broadcast_abar(abar, z_t)
    dtype = torch.result_type(z_t, model_output)
    sa = abar.sqrt().to(dtype)
    s1 = (1 - abar).sqrt().to(dtype)
    if prediction_type in _EPS:
        return (z_t - s1 * model_output) / sa
    return sa * z_t - s1 * model_output


def noise_ratio(alphas_cumprod: Tensor, t: Tensor | float) -> Tensor:
    """(1 - abar_t) / abar_t: the noise variance of x_t / sqrt(abar_t) relative to a unit-scale x0."""
    a = abar_at(alphas_cumprod, t)
    return (1 - a) / a


def t_for_noise_ratio(
    alphas_cumprod: Tensor, ratio: Tensor | float, t_min: float = 0.0, t_max: float | None = None
) -> Tensor:
    """Continuous ``t`` with (1 - abar_t) / abar_t == ``ratio``; the exact inverse of :func:`abar_at`.

    The ratio grows monotonically with t, so a sorted search finds the bracketing integers; the
    fraction between them is solved in alpha-bar (linear there, as in ``abar_at``), in float64 so
    tiny ratios near t=0 keep their precision. Ratios beyond the schedule give its end points;
    the result is then clamped to [t_min, t_max] (``t_max`` defaults to T-1). Not differentiable
    through the search (analysis use: the oracle aligner).
    """
    a = alphas_cumprod.detach().double()
    last = a.numel() - 1
    t_max = float(last) if t_max is None else float(t_max)
    if t_min > t_max:
        raise ValueError(f"t_min ({t_min}) must not exceed t_max ({t_max})")
    table = (1 - a) / a  # increasing in t
    r = torch.as_tensor(ratio, device=a.device).detach().double().clamp(min=0)
    target = 1 / (1 + r)  # the alpha-bar we look for
    hi = torch.searchsorted(table, r.reshape(-1)).reshape(r.shape).clamp(1, last)
    lo = hi - 1
    frac = ((a[lo] - target) / (a[lo] - a[hi])).clamp(0, 1)
    t = (lo.double() + frac).clamp(t_min, t_max)
    out_dtype = alphas_cumprod.dtype if alphas_cumprod.is_floating_point() else torch.float32
    return t.to(out_dtype)
