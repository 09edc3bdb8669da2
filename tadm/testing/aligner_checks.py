"""Contract checks of a timestep aligner (:class:`tadm.contracts.TimestepAligner`), built-in or
third-party::

    from tadm.testing import check_aligner

    check_aligner(MyAligner(t_min=10.0, t_max=200.0))

Each property is what the model relies on when it attaches and calls the aligner (CONTRIBUTING "Contracts
worth knowing"); :func:`check_aligner` runs them on copies, on both time conventions tadm has: SD's
1000-step DDPM schedule (TADM's reference units) and rectified flow (SD 3 / FLUX).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from tadm.contracts import TimestepAligner
from tadm.ops.diffusion import DDPMTime, FlowTime, TimeConvention, reference_alphas_cumprod
from tadm.testing.module_checks import (
    expect,
    expect_equal,
    expect_finite,
    expect_gradients_reach,
    expect_state_dict_round_trip,
    latents,
    no_grads_left,
    run_properties,
)
from tadm.testing.stage_checks import (
    BackboneFactory,
    expect_part_trains,
    slim_rescaler,
    stage_step,
    tiny_backbone,
)


def time_conventions() -> dict[str, TimeConvention]:
    """SD's DDPM schedule (the reference: timesteps map to themselves) and rectified flow (they map to
    the same noise level, [10, 200] -> [89.5, 363.7])."""
    return {"DDPM": DDPMTime(reference_alphas_cumprod(), "epsilon"), "flow": FlowTime()}


@dataclass(frozen=True)
class AlignerCase:
    """An aligner and the inputs its checks use."""

    aligner: TimestepAligner
    latent_channels: int
    #: latent height and width of z_hat (deliberately not square)
    latent_size: tuple[int, int]
    batch: int
    backbone: BackboneFactory
    stages: tuple[str, ...]

    def attached(self, time: TimeConvention, training: bool = False) -> TimestepAligner:
        """A copy, set up as the model sets it up: latent channels matched, time convention attached."""
        aligner = copy.deepcopy(self.aligner).train(training)
        aligner.match_latent_channels(self.latent_channels)
        aligner.attach_time(time)
        return aligner

    def inputs(self, scale: float = 1.0, seed: int = 1) -> tuple[Tensor, Tensor | None]:
        """z_hat (unit variance times ``scale``) and, for an aligner that needs it, a true latent near it."""
        z_hat = latents(self.batch, self.latent_channels, *self.latent_size, seed=seed) * scale
        z_true = None
        if self.aligner.needs_true_latent:
            z_true = z_hat + 0.3 * latents(self.batch, self.latent_channels, *self.latent_size, seed=seed + 1)
        return z_hat, z_true


def _latent_channels(case: AlignerCase) -> None:
    """``match_latent_channels`` accepts the backbone's count, and the aligner then expects that count."""
    aligner = copy.deepcopy(case.aligner)
    aligner.match_latent_channels(case.latent_channels)
    expect(
        aligner.latent_channels in (None, case.latent_channels),
        f"after match_latent_channels({case.latent_channels}) latent_channels is {aligner.latent_channels}",
    )


def _attach_time(case: AlignerCase) -> None:
    """``attach_time`` maps every configured timestep (``reference_timesteps``, written in TADM's units) into
    the backbone's: unchanged on SD's schedule, the same noise level on a flow one; attaching again maps from
    the configured values, never from already mapped ones; t_min <= t_max."""
    names = case.aligner.reference_timesteps
    missing = [n for n in names if not hasattr(case.aligner, n)]
    expect(not missing, f"reference_timesteps names {missing}, which the aligner does not have")
    configured = {n: getattr(case.aligner, n) for n in names}
    conventions = time_conventions()
    aligner = case.attached(conventions["flow"])
    for label in ("flow", "flow", "DDPM"):  # flow twice: no double mapping; then back to the reference
        time = conventions[label]
        aligner.attach_time(time)
        for n, value in configured.items():
            want = None if value is None else time.from_reference(float(value))
            got = getattr(aligner, n)
            expect(
                (got is None and want is None) or (got is not None and abs(float(got) - want) < 1e-4),
                f"after attach_time({label}) {n} is {got}, expected {want} (configured: {value})",
            )
        if aligner.t_min is not None and aligner.t_max is not None:
            expect(aligner.t_min <= aligner.t_max, f"t_min {aligner.t_min} > t_max {aligner.t_max}")


def _range(aligner: TimestepAligner, time: TimeConvention) -> tuple[float, float]:
    lo = 0.0 if aligner.t_min is None else float(aligner.t_min)
    hi = float(time.num_train_timesteps) if aligner.t_max is None else float(aligner.t_max)
    return lo, hi


def _timesteps(case: AlignerCase) -> None:
    """t is (B,) or a (B,1,h,w) map on z_hat's grid, float32 or wider (bf16 cannot hold most timesteps
    above 256), finite, and within [t_min, t_max] after ``attach_time`` ([0, T] when unbounded), on both
    conventions, for typical, large and constant latents."""
    b, (h, w) = case.batch, case.latent_size
    for label, time in time_conventions().items():
        aligner = case.attached(time)
        lo, hi = _range(aligner, time)
        tol = 1e-4 * max(1.0, hi)
        for what, scale in (("unit", 1.0), ("large", 30.0), ("constant", 0.0)):
            z_hat, z_true = case.inputs(scale)
            if scale == 0.0:
                z_hat = z_hat + 0.5
            with torch.no_grad():
                t = aligner(z_hat, z_true)
            where = f"t on a {what} z_hat ({label} time)"
            expect(
                tuple(t.shape) in ((b,), (b, 1, h, w)),
                f"{where} has shape {tuple(t.shape)}, expected ({b},) or ({b}, 1, {h}, {w})",
            )
            expect_finite(where, t)
            expect(
                t.dtype not in (torch.float16, torch.bfloat16), f"{where} is {t.dtype}; use float32 or wider"
            )
            expect(
                float(t.min()) >= lo - tol and float(t.max()) <= hi + tol,
                f"{where} spans [{float(t.min()):.4f}, {float(t.max()):.4f}], outside [{lo:.4f}, {hi:.4f}]",
            )


def _deterministic_in_eval(case: AlignerCase) -> None:
    """Eval mode: the same z_hat gives the same t, and an image's t does not depend on the other images
    of its batch (tiles are batched as they come)."""
    aligner = case.attached(time_conventions()["DDPM"])
    z_hat, z_true = case.inputs()
    with torch.no_grad():
        t = aligner(z_hat, z_true)
        expect_equal("t in eval mode", t, aligner(z_hat, z_true))
        lo, hi = _range(aligner, time_conventions()["DDPM"])
        for i in range(case.batch):
            one = aligner(z_hat[i : i + 1], None if z_true is None else z_true[i : i + 1])
            off = float((one[0] - t[i]).abs().max())
            expect(off <= 1e-4 * max(1.0, hi - lo), f"t of image {i} changes by {off} with its batch")


def _gradients(case: AlignerCase) -> None:
    """The timesteps reach every trainable parameter with a finite gradient (the aligner learns through
    the diffusion model and the Refiner that consume t)."""
    aligner = case.attached(time_conventions()["DDPM"], training=True)
    if not any(p.requires_grad for p in aligner.parameters()):
        return
    with no_grads_left(aligner):
        aligner(*case.inputs()).float().sum().backward()
        expect_gradients_reach(aligner, "t")


def _state_dict_round_trip(case: AlignerCase) -> None:
    """Saved and reloaded into a copy with other weights, the aligner gives identical t; the backbone's
    schedule it was attached to is not in its state dict (the backbone owns it)."""
    z_hat, z_true = case.inputs()
    aligner = case.attached(time_conventions()["DDPM"])
    expect_state_dict_round_trip(aligner, lambda a: {"t": a(z_hat, z_true)}, forbidden=("alphas_cumprod",))


def _stage_steps(case: AlignerCase) -> None:
    """One step of each stage in ``stages`` (default ``enhancer``) on the tiny backbone under a slim DFRM:
    a finite loss, frozen weights untouched, and the aligner trains (when it has parameters)."""
    for stage in case.stages:
        backbone = case.backbone()
        aligner = copy.deepcopy(case.aligner)
        result = stage_step(stage, backbone, slim_rescaler(backbone), aligner)
        if any(p.requires_grad for p in case.aligner.parameters()):
            expect_part_trains(result, "aligner", stage)


ALIGNER_PROPERTIES = {
    "latent channels": _latent_channels,
    "attach time": _attach_time,
    "timesteps": _timesteps,
    "deterministic in eval": _deterministic_in_eval,
    "gradients": _gradients,
    "state dict round trip": _state_dict_round_trip,
    "stage step": _stage_steps,
}


def check_aligner(
    aligner: TimestepAligner,
    *,
    latent_channels: int | None = None,
    latent_size: tuple[int, int] = (6, 10),
    batch: int = 2,
    backbone: BackboneFactory | None = None,
    stages: tuple[str, ...] = ("enhancer",),
    only: Collection[str] | None = None,
) -> list[str]:
    """Run every aligner contract check (:data:`ALIGNER_PROPERTIES`, or ``only`` those) on copies of
    ``aligner``; raises AssertionError naming the first property it breaks, returns the names checked.

    Args:
        aligner: the aligner as a config builds it (timesteps in TADM's reference units).
        latent_channels: channels of z_hat; default the aligner's ``latent_channels``, else 4 (SD's).
        latent_size: z_hat's height and width.
        batch: latents per call.
        backbone: builds a fresh backbone for each stage step (default: the tiny SD 2.1 twin).
        stages: the stages stepped (``enhancer`` and/or ``joint``; ``()`` for none).
        only: run just these properties.
    """
    channels = latent_channels or aligner.latent_channels or 4
    h, w = latent_size
    case = AlignerCase(aligner, channels, (h, w), batch, backbone or tiny_backbone, tuple(stages))
    return run_properties(f"aligner {type(aligner).__name__}", ALIGNER_PROPERTIES, case, only)
