"""Learning-rate schedules that know the run length without it being written twice."""

from __future__ import annotations

import logging
import math
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    ``total_steps: null`` (the default) is filled in by TADMModule from the Trainer's
    ``estimated_stepping_batches`` (:meth:`follow_run_length`), so ``trainer.max_steps`` is the only place the
    run length lives, on a resume too: a run resumed with a longer (or shorter) ``max_steps``, or on another
    number of processes, decays over its new length from the step it stands at, where the checkpoint's
    restored ``total_steps`` would have held the LR at its floor for every step past the old end.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.follows_run = False
        """True when ``total_steps`` is the trainer's run length (filled in), not a typed number."""
        super().__init__(optimizer, self._factor)

    def follow_run_length(self, total_steps: int) -> None:
        """Decay over the trainer's run length; a resume keeps this length over the checkpoint's."""
        self.total_steps, self.follows_run = int(total_steps), True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; a run length taken from the trainer stays this run's (logged if it moved)."""
        total, follows = self.total_steps, self.follows_run
        super().load_state_dict(state_dict)
        if not follows:
            return
        stored, self.total_steps, self.follows_run = self.total_steps, total, True
        if stored == total:
            return
        factor = self._factor(self.last_epoch)  # the step about to run takes its LR from the new length
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if getattr(rank_zero_only, "rank", 0) == 0:
            logging.getLogger("tadm").info(
                "the run's length changed on resume: the cosine LR schedule now ends at step %s (the "
                "checkpoint's ended at step %s); step %d runs at LR x%.3g",
                total,
                stored,
                self.last_epoch,
                factor,
            )

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:  # not yet known (before the trainer fills it in): hold the base LR
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PiecewiseConstantLR(LambdaLR):
    """The base LR times ``multipliers[i]`` until optimiser step ``boundaries[i]``, then ``final``.

    The authors' release uses diffusers' ``piecewise_constant`` schedule; e.g. its stage 1
    (``"1:100000,0.5:100000,0.5:100000,1"``: repeated boundaries collapse, so 0.5x until 100k scheduler
    steps, then 1x) is ``boundaries: [100000], multipliers: [0.5]``. Boundaries count the optimiser
    steps Lightning takes; accelerate advanced the release's scheduler once per GPU per optimiser step,
    so its steps on 2 GPUs are half as many of ours (``configs/experiments/release/`` converts them).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        boundaries: list[int] | None = None,
        multipliers: list[float] | None = None,
        final: float = 1.0,
    ) -> None:
        self.boundaries = list(boundaries or [])
        self.multipliers = list(multipliers or [])
        if len(self.boundaries) != len(self.multipliers):
            raise ValueError(
                f"PiecewiseConstantLR needs one multiplier per boundary, got {len(self.boundaries)} "
                f"boundaries and {len(self.multipliers)} multipliers"
            )
        if self.boundaries != sorted(self.boundaries):
            raise ValueError(f"PiecewiseConstantLR boundaries must increase, got {self.boundaries}")
        self.final = final
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        for boundary, multiplier in zip(self.boundaries, self.multipliers, strict=True):
            if step < boundary:
                return multiplier
        return self.final
