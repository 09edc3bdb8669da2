"""Noise-schedule arithmetic for the one-step enhancer, at CONTINUOUS timesteps.

The TPM predicts a real-valued timestep (e.g. 37.4) and learns through it, so alpha-bar is read
off the discrete training schedule by linear interpolation (differentiable in ``t``), and the
x0 estimate accepts one alpha-bar per sample (B,) or a per-pixel map (B,1,h,w).

Two families of formulas live here: DDPM (the SD UNets: eps / v / sample prediction on alpha-bar) and
rectified flow (SD 3, FLUX.1: velocity prediction, sigma = t / 1000). A backbone declares which one its
timesteps follow with a :class:`TimeConvention` (:class:`DDPMTime`, :class:`FlowTime`); the enhancer and
the aligners use only that.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: prediction types as diffusers' scheduler configs spell them, plus short aliases
_EPS = ("epsilon", "eps")
_V = ("v_prediction", "v")
_SAMPLE = ("sample",)
PREDICTION_TYPES = _EPS + _V + _SAMPLE


def _float_t(alphas_cumprod: Tensor, t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor on the schedule's device, at least the schedule's precision.

    A Python number is filled in on the device rather than copied there (``as_tensor``): on a GPU that copy
    blocks the CPU until the GPU is idle, once per enhancer tile for the hybrid scheduler's fixed t0."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        kind = torch.get_default_dtype() if isinstance(t, float) else torch.int64  # as_tensor's dtype
        t = torch.full((), t, dtype=kind, device=alphas_cumprod.device)
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
    # take, not a[lo]: indexing with a 0-dim tensor reads its value on the host (a GPU sync)
    return torch.take(a, lo) * (1 - frac) + torch.take(a, lo + 1) * frac


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
    dtype = torch.promote_types(z_t.dtype, model_output.dtype)  # result_type: a graph break under compile
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


# ----------------------------------------------------------------------------- rectified flow (SD 3, FLUX.1)
# z_t = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1]; the transformer predicts the velocity
# v = noise - x0. diffusers feeds it timesteps t = sigma * num_train_timesteps (1000), AFTER the time shift:
# the shift decides which sigmas a schedule visits, never how t relates to sigma.

#: prediction type of a rectified-flow (velocity) model, as tadm's backbones declare it
FLOW = "flow"


def flow_sigma(t: Tensor | float, num_train_timesteps: int = 1000) -> Tensor:
    """sigma = t / T, clamped to [0, 1], at least float32 (differentiable in ``t`` inside the range)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.float()
    return (t / num_train_timesteps).clamp(0.0, 1.0)


def flow_x0(z_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """One-step clean-latent estimate of a velocity model: x0 = z_t - sigma * v.

    Exactly what ``FlowMatchEulerDiscreteScheduler.step`` computes for a step from ``sigma`` to 0.
    ``sigma`` is a scalar, (B,) or a (B,1,h,w) map at the latent's size.
    """
    if z_t.ndim != 4 or velocity.shape != z_t.shape:
        raise ValueError(
            f"z_t and velocity must be (B,C,h,w) of equal shape, got {tuple(z_t.shape)} and {tuple(velocity.shape)}"
        )
    s = _broadcast_abar(sigma, z_t)
    return z_t - s.to(torch.promote_types(z_t.dtype, velocity.dtype)) * velocity


def flow_noise_ratio(sigma: Tensor | float) -> Tensor:
    """(sigma / (1 - sigma))^2: the noise variance of z_t / (1 - sigma) relative to a unit-scale x0 (the
    flow counterpart of :func:`noise_ratio`)."""
    s = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else None)
    return (s / (1 - s)) ** 2


def flow_sigma_for_noise_ratio(ratio: Tensor | float) -> Tensor:
    """The sigma with (sigma / (1 - sigma))^2 == ``ratio``: sqrt(r) / (1 + sqrt(r)) (negative ratios: 0)."""
    root = torch.as_tensor(ratio).double().clamp(min=0).sqrt()
    return root / (1 + root)


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """SD 3's time shift of a schedule: shift * s / (1 + (shift - 1) * s) (``FlowMatchEulerDiscreteScheduler``
    with ``shift``; 1 leaves sigma unchanged). FLUX's exponential shift by ``mu`` is this with shift = e^mu."""
    s = torch.as_tensor(sigma)
    return shift * s / (1 + (shift - 1) * s)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu`` (the pipeline's ``calculate_shift``): linear in the number of
    packed image tokens, ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def scheduler_shift(config: dict, image_seq_len: int) -> float:
    """The static shift equivalent to a ``FlowMatchEulerDiscreteScheduler`` config at ``image_seq_len``
    packed tokens: ``shift`` (SD 3), or e^mu / mu of the dynamic shift (FLUX.1-dev; the exponential shift
    with exponent 1, e^mu / (e^mu + 1/s - 1), is :func:`shift_sigma` with shift = e^mu)."""
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = dynamic_shift_mu(
        image_seq_len,
        int(config.get("base_image_seq_len", 256)),
        int(config.get("max_image_seq_len", 4096)),
        float(config.get("base_shift", 0.5)),
        float(config.get("max_shift", 1.15)),
    )
    if config.get("time_shift_type", "exponential") == "linear":
        return float(mu)
    return float(math.exp(mu))


# ------------------------------------------------------------------------------- time conventions
#: TADM's timesteps are written for SD's 1000-step DDPM schedule (scaled_linear, 0.00085 .. 0.012): the TPM
#: range [10, 200] and t0 = 50 are numbers on it. Other conventions map them with ``from_reference``.
REFERENCE_TIMESTEPS = 1000
ReferenceMap = Literal["noise_level", "fraction"]
REFERENCE_MAPS: tuple[str, ...] = ("noise_level", "fraction")


def reference_alphas_cumprod() -> Tensor:
    """Alpha-bar of the reference schedule, as diffusers' ``DDPMScheduler(beta_schedule="scaled_linear",
    beta_start=0.00085, beta_end=0.012)`` computes it (float32)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, REFERENCE_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class TimeConvention(ABC):
    """How a backbone's timesteps relate to noise: all the enhancer, the aligners and the oracle need.

    Timesteps are always in the backbone's own units (what its diffusion model's time embedding takes);
    :meth:`from_reference` converts a timestep written for TADM's reference schedule (see
    ``REFERENCE_TIMESTEPS``) into them, so configured ranges (TPM [10, 200], t0 = 50) follow the backbone.
    """

    #: ``ddpm`` or ``flow``
    kind: str
    #: the top of the timestep range (T): timesteps lie in [0, T]
    num_train_timesteps: int

    @abstractmethod
    def x0(self, z_t: Tensor, model_output: Tensor, t: Tensor | float) -> Tensor:
        """One-step clean-latent estimate from the model output at timesteps ``t`` (scalar, (B,) or map)."""

    @abstractmethod
    def noise_ratio(self, t: Tensor | float) -> Tensor:
        """Noise variance of the rescaled z_t relative to a unit-scale x0, at ``t``."""

    @abstractmethod
    def t_for_noise_ratio(
        self, ratio: Tensor | float, t_min: float = 0.0, t_max: float | None = None
    ) -> Tensor:
        """The ``t`` whose :meth:`noise_ratio` is ``ratio``, clamped to [t_min, t_max] (analysis: the oracle)."""

    @abstractmethod
    def from_reference(self, t: float) -> float:
        """A timestep of TADM's reference schedule (1000-step SD DDPM) in this convention's units."""


@dataclass(frozen=True, eq=False)
class DDPMTime(TimeConvention):
    """A discrete DDPM schedule read at continuous t (the Stable Diffusion UNets).

    ``from_reference`` keeps the same fraction of the schedule: the identity for 1000 steps, which every
    SD family has (their schedules are TADM's reference), so UNet behaviour is exactly what it was.
    """

    alphas_cumprod: Tensor
    prediction_type: str | None = None
    kind: str = "ddpm"

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return int(self.alphas_cumprod.numel())

    def x0(self, z_t: Tensor, model_output: Tensor, t: Tensor | float) -> Tensor:
        if self.prediction_type is None:
            raise ValueError("this DDPM time convention has no prediction_type: it cannot estimate x0")
        return x0_from_output(z_t, model_output, abar_at(self.alphas_cumprod, t), self.prediction_type)

    def noise_ratio(self, t: Tensor | float) -> Tensor:
        return noise_ratio(self.alphas_cumprod, t)

    def t_for_noise_ratio(
        self, ratio: Tensor | float, t_min: float = 0.0, t_max: float | None = None
    ) -> Tensor:
        return t_for_noise_ratio(self.alphas_cumprod, ratio, t_min, t_max)

    def from_reference(self, t: float) -> float:
        n = self.num_train_timesteps
        return t if n == REFERENCE_TIMESTEPS else t * n / REFERENCE_TIMESTEPS


@dataclass(frozen=True)
class FlowTime(TimeConvention):
    """Rectified flow (SD 3.x, FLUX.1): t = sigma * T, velocity output, x0 = z_t - sigma * v.

    ``reference`` says how TADM's reference timesteps map (see docs/method.md, "Flow-matching backbones"):

    - ``noise_level`` (default): the same noise level. The aligner's t stands for how noisy z_hat is (the
      oracle makes that literal), and every family's latents are scaled to about unit variance, so a
      reference t maps to the sigma with the same noise-to-signal ratio: (sigma / (1 - sigma))^2 =
      (1 - abar_t) / abar_t. [10, 200] -> sigma [0.089, 0.364]; t0 = 50 -> sigma 0.184. Independent of
      resolution, and consistent with the oracle aligner.
    - ``fraction``: the same fraction of the model's training schedule: sigma = shift(t / 1000) with the
      backbone's time shift at its native resolution (SD 3: 3.0; FLUX.1-dev: e^1.15 at 1024 px).
    """

    num_train_timesteps: int = 1000
    #: static shift of the training schedule at the native resolution (informs ``fraction`` only)
    shift: float = 1.0
    reference: ReferenceMap = "noise_level"
    kind: str = "flow"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MAPS:
            raise ValueError(
                f"unknown reference map {self.reference!r}; choose one of {list(REFERENCE_MAPS)}"
            )
        if self.shift <= 0:
            raise ValueError(f"the time shift must be > 0, got {self.shift}")

    def sigma(self, t: Tensor | float) -> Tensor:
        return flow_sigma(t, self.num_train_timesteps)

    def x0(self, z_t: Tensor, model_output: Tensor, t: Tensor | float) -> Tensor:
        if not torch.is_tensor(t):  # filled on the device: a host copy would make the CPU wait for a GPU
            t = torch.full((), float(t), device=z_t.device)
        return flow_x0(z_t, model_output, self.sigma(t).to(z_t.device))

    def noise_ratio(self, t: Tensor | float) -> Tensor:
        return flow_noise_ratio(self.sigma(t))

    def t_for_noise_ratio(
        self, ratio: Tensor | float, t_min: float = 0.0, t_max: float | None = None
    ) -> Tensor:
        t_max = float(self.num_train_timesteps) if t_max is None else float(t_max)
        if t_min > t_max:
            raise ValueError(f"t_min ({t_min}) must not exceed t_max ({t_max})")
        t = flow_sigma_for_noise_ratio(torch.as_tensor(ratio).detach()) * self.num_train_timesteps
        dtype = ratio.dtype if torch.is_tensor(ratio) and ratio.is_floating_point() else torch.float32
        return t.clamp(t_min, t_max).to(dtype)

    def from_reference(self, t: float) -> float:
        if self.reference == "fraction":
            sigma = shift_sigma(torch.tensor(t / REFERENCE_TIMESTEPS, dtype=torch.float64), self.shift)
        else:
            sigma = flow_sigma_for_noise_ratio(noise_ratio(reference_alphas_cumprod().double(), float(t)))
        return float(sigma) * self.num_train_timesteps
