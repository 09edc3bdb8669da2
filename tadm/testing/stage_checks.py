"""A stage step: one training step of tadm's LightningModule with a plug-in in place, on a tiny backbone
twin, the check that the plug-in really trains inside tadm (not only on its own).

The parts a check does not test come from here too: the tiny Stable Diffusion 2.1 twin (random weights, 2 M
parameters with its LoRA, no download), a slim DFRM built for the backbone's latent and a slim TPM.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.contracts import DiffusionBackbone, Rescaler, TimestepAligner
from tadm.testing.module_checks import expect, expect_gradients_reach, images, latents

#: a backbone for a check: called once per module built (each stage needs a fresh, unloaded one)
BackboneFactory = Callable[[], DiffusionBackbone]


def tiny_backbone() -> DiffusionBackbone:
    """The tiny random twin of Stable Diffusion 2.1 (what the configs are tested on), unloaded."""
    from tadm.testing.twins.unet_twins import StableDiffusionTwin

    return StableDiffusionTwin(preset="tiny-sd21")


def slim_rescaler(backbone: DiffusionBackbone, scale: int = 16) -> Rescaler:
    """A DFRM of 0.17 M parameters built for ``backbone``'s latent (read before any weight loads)."""
    from tadm.components.rescalers.dfrm import DFRM

    return DFRM(
        scale=scale,
        latent_channels=backbone.latent_channels,
        latent_factor=backbone.downsample_factor,
        width=16,
        pixel_width=4,
        num_resblocks=1,
        num_couplings=2,
        coupling_growth=8,
    )


def default_aligner() -> TimestepAligner:
    """TADM's TPM, slimmed; it follows the backbone's latent channels."""
    from tadm.components.aligners.tpm import TimestepPredictionModule

    return TimestepPredictionModule(width=8, hidden=16)


def _lightning_module() -> Any:
    """The one place the check names tadm's LightningModule (imported late: Lightning is slow to import)."""
    from tadm.training.lightning_module import TADMModule

    return TADMModule


#: the plug-ins of a module, as its attributes name them
PARTS = ("rescaler", "aligner", "backbone")


@dataclass
class StepResult:
    """What one training step did: per part (``rescaler``, ``aligner``, ``backbone``), the names of its
    trainable parameters and of those the step changed (names within the part)."""

    loss: float
    trainable: dict[str, set[str]]
    changed: dict[str, set[str]]


def stage_step(
    stage: str,
    backbone: DiffusionBackbone,
    rescaler: Rescaler,
    aligner: TimestepAligner | None = None,
    size: int = 64,
    batch: int = 1,
) -> StepResult:
    """One step of ``stage`` (``rescaler``, ``enhancer`` or ``joint``) on random images of ``size`` px: the
    module built as YAML builds it and configured as a trainer configures it (it loads what the stage
    needs), unit loss weights for every term the rescaler returns and the enhancer's pixel term (no
    perceptual terms: their VGG is a download), AdamW without weight decay, so exactly the parameters with
    a non-zero gradient move. Asserts a finite loss, gradients on every trainable parameter and none on a
    frozen one, and no frozen weight changed."""
    x = images(batch, size)
    weights = {name: 1.0 for name in _rescaler_terms(stage, backbone, rescaler, x)}
    if stage != "rescaler":
        weights["pixel"] = 1.0
    module = _lightning_module()(
        backbone=backbone,
        rescaler=rescaler,
        stage=stage,
        scale=rescaler.scale,
        aligner=aligner,
        loss_weights=weights,
    )
    module.configure_model()  # what a trainer calls first: the frozen backbone loads here
    params = module.trainable_parameters()
    expect(bool(params), f"stage {stage!r} has nothing to train")
    ids = {id(p) for p in params}
    before = {id(p): p.detach().clone() for p in module.parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    module.train()
    with warnings.catch_warnings():  # no trainer to log to: the module's self.log calls are no-ops
        warnings.filterwarnings("ignore", message=".*self.log.*trainer")
        loss = module.training_step({"image": x}, 0)
    expect(loss.ndim == 0 and bool(torch.isfinite(loss)), f"stage {stage!r}: the loss is {loss}")
    loss.backward()
    expect_gradients_reach(module, f"the stage-{stage!r} loss")
    optimizer.step()
    changed = {id(p) for p in module.parameters() if not torch.equal(before[id(p)], p.detach())}
    frozen = [n for n, p in module.named_parameters() if id(p) in changed - ids]
    expect(not frozen, f"stage {stage!r} changed frozen weights: {frozen[:5]}")
    parts = {name: getattr(module, name) for name in PARTS if getattr(module, name) is not None}
    return StepResult(
        float(loss.detach()),
        {k: {n for n, p in m.named_parameters() if id(p) in ids} for k, m in parts.items()},
        {k: {n for n, p in m.named_parameters() if id(p) in changed} for k, m in parts.items()},
    )


def _rescaler_terms(stage: str, backbone: DiffusionBackbone, rescaler: Rescaler, x: Tensor) -> list[str]:
    """The names of the rescaler's loss terms (they need weights), from a copy on a random latent of the
    backbone's layout (read before any weight loads, as the CLI links it)."""
    if stage == "enhancer":
        return []
    z = None
    if rescaler.space == "latent":
        f = backbone.downsample_factor
        channels = rescaler.latent_channels or backbone.latent_channels  # a mismatch is the module's error
        z = latents(x.shape[0], channels, x.shape[-2] // f, x.shape[-1] // f)
    with torch.no_grad():
        return list(copy.deepcopy(rescaler).training_losses(x, z, F.mse_loss))


def expect_part_trains(result: StepResult, part: str, stage: str) -> None:
    """``part`` (``rescaler``, ``aligner`` or ``backbone``) has trainable parameters in ``stage``, and the
    step moved some of them."""
    expect(bool(result.trainable.get(part)), f"stage {stage!r} trains nothing of the {part}")
    expect(
        bool(result.changed.get(part)),
        f"one step of stage {stage!r} changed none of the {part}'s parameters (all gradients zero?)",
    )
