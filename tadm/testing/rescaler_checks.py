"""Contract checks of a rescaler (:class:`tadm.contracts.Rescaler`), built-in or third-party::

    from tadm.testing import check_rescaler

    check_rescaler(MyRescaler(scale=16, latent_channels=4))

Each property below is what the core relies on when it calls the rescaler (see CONTRIBUTING "Contracts
worth knowing"); :func:`check_rescaler` runs them all on copies (the instance passed in is left as it was).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.contracts import Rescaler
from tadm.testing.module_checks import (
    expect,
    expect_equal,
    expect_finite,
    expect_gradients_reach,
    expect_shape,
    expect_state_dict_round_trip,
    images,
    latents,
    no_grads_left,
    run_properties,
)
from tadm.testing.stage_checks import (
    BackboneFactory,
    default_aligner,
    expect_part_trains,
    stage_step,
    tiny_backbone,
)


@dataclass(frozen=True)
class RescalerCase:
    """A rescaler and the inputs its checks use."""

    rescaler: Rescaler
    #: HR image side (a multiple of the scale); the LR image is size / scale
    size: int
    batch: int
    #: the backbone's downsampling the rescaler was built for (its ``latent_factor``): z is size / this
    latent_factor: int
    #: builds the backbone of the stage steps (default: the tiny SD 2.1 twin, 4 latent channels)
    backbone: BackboneFactory
    #: stages stepped: ``rescaler`` (stage 1) and ``joint`` (stage 3, the enhancer on the rescaler)
    stages: tuple[str, ...]

    def fresh(self, training: bool) -> Rescaler:
        return copy.deepcopy(self.rescaler).train(training)

    def image(self) -> Tensor:
        return images(self.batch, self.size)

    def latent(self) -> Tensor | None:
        """The HR latent for a latent rescaler (its ``latent_channels``, 4 when it takes any), else None."""
        if self.rescaler.space != "latent":
            return None
        side = self.size // self.latent_factor
        return latents(self.batch, self.rescaler.latent_channels or 4, side, side)

    def lr_shape(self) -> tuple[int, ...]:
        side = self.size // self.rescaler.scale
        return (self.batch, 3, side, side)

    def upscaled_shape(self) -> tuple[int, ...]:
        """(B, 3, H, W) for a pixel rescaler; the latent's shape for a latent one."""
        z = self.latent()
        return (self.batch, 3, self.size, self.size) if z is None else tuple(z.shape)

    def upscale(self, rescaler: Rescaler, y: Tensor) -> Tensor:
        """``upscale(y)``, with the rescaler's own draw when it samples (as the pipeline calls it)."""
        noise = rescaler.upscale_noise(y)
        return rescaler.upscale(y) if noise is None else rescaler.upscale(y, noise)  # type: ignore[call-arg]


def _downscale(case: RescalerCase) -> None:
    """(B,3,H/s,W/s), the input's dtype, finite and in [-1, 1], in training and in eval mode."""
    x, z = case.image(), case.latent()
    for training in (True, False):
        mode = "training" if training else "eval"
        with torch.no_grad():
            y = case.fresh(training).downscale(x, z)
        expect_shape(f"downscale's LR image ({mode} mode)", y, case.lr_shape())
        expect(y.dtype == x.dtype, f"downscale returns {y.dtype} for a {x.dtype} image ({mode} mode)")
        expect_finite(f"downscale's LR image ({mode} mode)", y)
        expect(
            float(y.min()) >= -1.0 and float(y.max()) <= 1.0,
            f"downscale's LR image ({mode} mode) spans [{float(y.min()):.4f}, {float(y.max()):.4f}], "
            "outside [-1, 1]",
        )


def _eight_bit_in_eval(case: RescalerCase) -> None:
    """In eval mode the LR image is exactly what an 8-bit PNG stores (``quantize_8bit(y, False)``)."""
    with torch.no_grad():
        y = case.fresh(False).downscale(case.image(), case.latent())
    v = (y.double() + 1.0) * 127.5
    off = float((v - v.round()).abs().max())
    expect(off < 1e-3, f"the eval-mode LR image is not on the 8-bit grid (off by {off:.4f} of a level)")


def _upscale(case: RescalerCase) -> None:
    """``upscale`` gives a latent of the backbone's layout (``space = "latent"``) or an image of the HR size
    (``"pixel"``), finite; a sampling rescaler's ``upscale_noise`` is on the LR grid."""
    expect(case.rescaler.space in ("latent", "pixel"), f"space is {case.rescaler.space!r}")
    r = case.fresh(False)
    with torch.no_grad():
        y = r.downscale(case.image(), case.latent())
        noise = r.upscale_noise(y)
        if noise is not None:
            expect(
                noise.shape[0] == y.shape[0] and noise.shape[-2:] == y.shape[-2:],
                f"upscale_noise gives {tuple(noise.shape)}, not a draw on the LR grid {tuple(y.shape)}",
            )
        out = case.upscale(r, y)
    what = "latent" if case.rescaler.space == "latent" else "image"
    expect_shape(f"upscale's {what}", out, case.upscaled_shape())
    expect(out.dtype == y.dtype, f"upscale returns {out.dtype} for a {y.dtype} LR image")
    expect_finite(f"upscale's {what}", out)


def _deterministic_in_eval(case: RescalerCase) -> None:
    """Eval mode: the same HR image gives the same LR image, and the same LR image (and draw) the same
    reconstruction (``tadm downscale`` / ``upscale`` twice agree)."""
    r = case.fresh(False)
    x, z = case.image(), case.latent()
    with torch.no_grad():
        y = r.downscale(x, z)
        expect_equal("downscale in eval mode", y, r.downscale(x, z))
        noise = r.upscale_noise(y)
        if noise is None:
            expect_equal("upscale in eval mode", r.upscale(y), r.upscale(y))
        else:
            up = r.upscale(y, noise)  # type: ignore[call-arg]
            expect_equal("upscale(y, noise) in eval mode", up, r.upscale(y, noise))  # type: ignore[call-arg]


def _losses(case: RescalerCase, r: Rescaler) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    outputs: dict[str, Tensor] = {}
    terms = r.training_losses(case.image(), case.latent(), F.mse_loss, outputs=outputs)
    return terms, outputs


def _training_losses(case: RescalerCase) -> None:
    """Named, finite scalar terms (non-empty when the rescaler has parameters to train); an
    ``outputs["z_hat"]`` it fills is what ``upscale`` returns, with gradients (stage 3 trains through it)."""
    r = case.fresh(True)
    with no_grads_left(r):
        terms, outputs = _losses(case, r)
    expect(isinstance(terms, dict), f"training_losses returns {type(terms).__name__}, not a dict")
    if r.has_trainable_parameters:
        expect(bool(terms), "training_losses returns no terms, but the rescaler has parameters to train")
    for name, term in terms.items():
        expect(isinstance(name, str) and name.isidentifier(), f"loss term name {name!r} is not an identifier")
        expect(isinstance(term, Tensor) and term.ndim == 0, f"loss term {name!r} is not a scalar tensor")
        expect_finite(f"loss term {name!r}", term)
    if "z_hat" in outputs:
        expect_shape('outputs["z_hat"]', outputs["z_hat"], case.upscaled_shape())
        expect(
            outputs["z_hat"].requires_grad or not r.has_trainable_parameters,
            'outputs["z_hat"] carries no gradient (stage 3 trains the rescaler through it)',
        )


def _gradients(case: RescalerCase) -> None:
    """The sum of the loss terms reaches every trainable parameter with a finite gradient."""
    r = case.fresh(True)
    if not r.has_trainable_parameters:
        return
    with no_grads_left(r):
        terms, _ = _losses(case, r)
        torch.stack(list(terms.values())).sum().backward()
        expect_gradients_reach(r, "training_losses")


def _state_dict_round_trip(case: RescalerCase) -> None:
    """Saved and reloaded into a copy with other weights, the rescaler gives identical LR images and
    reconstructions (in eval mode)."""
    x, z = case.image(), case.latent()

    def outputs(r: Rescaler) -> dict[str, Tensor]:
        y = r.downscale(x, z)
        return {"downscale": y, "upscale": case.upscale(r, y)}

    expect_state_dict_round_trip(case.fresh(False), outputs)


def _stage_steps(case: RescalerCase) -> None:
    """One step of each stage in ``stages`` on the tiny backbone: the rescaler trains (stage 1 only when it
    has parameters), the loss is finite and frozen weights stay put."""
    for stage in case.stages:
        r = case.fresh(True)
        if stage == "rescaler" and not r.has_trainable_parameters:
            continue  # nothing to train in stage 1: the parameter-free baseline
        aligner = default_aligner() if stage != "rescaler" else None
        result = stage_step(stage, case.backbone(), r, aligner, size=case.size, batch=1)
        if r.has_trainable_parameters:
            expect_part_trains(result, "rescaler", stage)


RESCALER_PROPERTIES = {
    "downscale": _downscale,
    "8-bit in eval": _eight_bit_in_eval,
    "upscale": _upscale,
    "deterministic in eval": _deterministic_in_eval,
    "training losses": _training_losses,
    "gradients": _gradients,
    "state dict round trip": _state_dict_round_trip,
    "stage step": _stage_steps,
}


def check_rescaler(
    rescaler: Rescaler,
    *,
    size: int | None = None,
    batch: int = 2,
    latent_factor: int = 8,
    backbone: BackboneFactory | None = None,
    stages: tuple[str, ...] = ("rescaler", "joint"),
    only: Collection[str] | None = None,
) -> list[str]:
    """Run every rescaler contract check (:data:`RESCALER_PROPERTIES`, or ``only`` those) on copies of
    ``rescaler``; raises AssertionError naming the first property it breaks, returns the names checked.

    Args:
        rescaler: the rescaler, as a config would build it (its ``scale``; a latent one built for the
            backbone of the stage steps: 4 latent channels and factor 8 for the default tiny SD twin).
        size: HR image side; default 4 x the scale (a 4 x 4 LR image).
        batch: images per call.
        latent_factor: the backbone downsampling the rescaler was built for (its ``latent_factor``).
        backbone: builds a fresh backbone for each stage step (default: the tiny SD 2.1 twin); its latent
            must be the one the rescaler was built for.
        stages: the stages stepped; ``("rescaler",)`` for a backbone without a diffusion model, ``()``
            for none.
        only: run just these properties.
    """
    size = 4 * rescaler.scale if size is None else size
    expect(size % rescaler.scale == 0 and size % latent_factor == 0, f"size {size} fits neither scale")
    case = RescalerCase(rescaler, size, batch, latent_factor, backbone or tiny_backbone, tuple(stages))
    return run_properties(f"rescaler {type(rescaler).__name__}", RESCALER_PROPERTIES, case, only)
