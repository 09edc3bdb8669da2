"""An exponential moving average (EMA) of the trained tensors only.

The averaging itself is diffusers' :class:`~diffusers.training_utils.EMAModel` (its update, warm-up and
store / copy_to / restore swap). It is used rather than torch's ``AveragedModel`` or Lightning's
``WeightAveraging`` callback because both deep-copy the *whole* module: here that is the frozen
diffusion backbone (3.5 GB in fp32 for SD 2.1) and the loss networks, although only a small subset
(LoRA, aligner, Refiner, the DFRM) is trained. The callback would also write the full averaged
state, frozen weights included, into every checkpoint, and copy the average over the raw weights at
the end of training. :class:`TrainedEMA` adds what ``EMAModel`` lacks: names, so a checkpoint stores
``{parameter name: average}`` and ``tadm export`` / the codec can put the averages in place of the
raw tensors, and a checked, named ``state_dict`` for exact resumption.

Decay per update (``EMAModel.get_decay`` without ``use_ema_warmup``): the ``u``-th update (``u = 1,
2, ...`` optimiser steps since the EMA began) with ``s = start_step`` uses

* ``0`` (a plain copy of the weights) while ``u <= s + 1``;
* ``min(decay, (u - s) / (9 + u - s))`` after that: 0.18, 0.25, 0.31 ... so an early average is not
  dominated by the random initial weights; ``decay`` 0.999 is reached after 8991 updates.

``ema = decay_u * ema + (1 - decay_u) * weights``, accumulated in float32 whatever the weights' dtype: with
16-bit weights (``bf16-true``) and decay 0.999 an update smaller than half a bf16 step (the weights within
~500 steps of the average) rounds away, so a bf16 average stops following the weights. Under DDP every
rank updates its own copy after the optimiser step from the same (all-reduced) weights, so the copies
stay identical with no communication.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from tadm.errors import CheckpointError


def check_ema_args(decay: float | None, start_step: int) -> None:
    """A clear error for a decay outside (0, 1) or a negative start step (before any work)."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"model.ema_decay must be in (0, 1) (e.g. 0.999) or null for no EMA, got {decay}")
    if start_step < 0:
        raise ValueError(f"model.ema_start_step must be >= 0, got {start_step}")


def average_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the average of weights of ``dtype`` is kept in: float32 for 16-bit floats (see the module)."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


def decay_at(update: int, decay: float, start_step: int = 0) -> float:
    """The decay of the ``update``-th EMA update (1-based), as the module docstring gives it."""
    k = update - start_step - 1
    return 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))


class TrainedEMA:
    """EMA of named parameters: ``update()`` after each optimiser step, ``swapped_in()`` to evaluate."""

    def __init__(
        self, named: Sequence[tuple[str, torch.nn.Parameter]], decay: float, start_step: int = 0
    ) -> None:
        """
        Args:
            named: the trained parameters with their names in the module (state-dict keys).
            decay: the EMA's decay once warmed up, e.g. 0.999.
            start_step: updates that copy the weights before averaging begins.
        """
        from diffusers.training_utils import EMAModel

        check_ema_args(decay, start_step)
        self.names = [n for n, _ in named]
        if len(set(self.names)) != len(self.names):
            raise ValueError("TrainedEMA: parameter names repeat")
        self.params = [p for _, p in named]
        self.ema = EMAModel(self.params, decay=decay, update_after_step=start_step, foreach=True)
        self.ema.shadow_params = [s.to(average_dtype(s.dtype)) for s in self.ema.shadow_params]
        self.swapped = False

    @property
    def updates(self) -> int:
        """Updates so far (optimiser steps since the EMA began)."""
        return int(self.ema.optimization_step)

    def update(self) -> None:
        """One EMA step from the current weights (call after the optimiser step)."""
        self.ema.step(self.params)

    def weights(self) -> dict[str, Tensor]:
        """The averages by parameter name (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.ema.shadow_params, strict=True))

    def raw_weights(self) -> dict[str, Tensor]:
        """The trained (non-averaged) weights, also while the averages are swapped in."""
        if self.swapped:
            stored = self.ema.temp_stored_params
            assert stored is not None
            return {n: s.to(p.device) for n, s, p in zip(self.names, stored, self.params, strict=True)}
        return {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in the parameters inside the block, the raw weights restored exactly after."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def swap_in(self) -> None:
        """Put the averages into the parameters, keeping the raw weights (no-op when already in)."""
        if self.swapped:
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        self.swapped = True

    def swap_out(self) -> None:
        """Restore the raw weights :meth:`swap_in` kept (no-op when not swapped in)."""
        if not self.swapped:
            return
        self.ema.restore(self.params)
        self.swapped = False

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (``torch.load(weights_only=True)`` reads them): the averages by name, the
        update count and the settings."""
        return {
            "weights": self.weights(),
            "updates": self.updates,
            "decay": float(self.ema.decay),
            "start_step": int(self.ema.update_after_step),
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Continue from a saved EMA: same names and shapes as this one's parameters, or a
        :class:`CheckpointError` naming ``source``. The saved update count continues (the decay of the
        next update follows from it); the decay and start step are this run's settings."""
        weights = check_ema_state(state, source)
        if list(weights) != self.names:
            missing = sorted(set(self.names) - set(weights))
            extra = sorted(set(weights) - set(self.names))
            raise CheckpointError(
                f"{source}: its EMA does not match this model's trained parameters "
                f"(missing {missing[:4]}, unexpected {extra[:4]}); resume with the same stage and model"
            )
        for name, value, p in zip(self.names, weights.values(), self.params, strict=True):
            if value.shape != p.shape:
                raise CheckpointError(
                    f"{source}: EMA tensor {name!r} has shape {tuple(value.shape)}, the model's {tuple(p.shape)}"
                )
        self.ema.shadow_params = [
            v.detach().to(device=p.device, dtype=average_dtype(p.dtype)).clone()
            for v, p in zip(weights.values(), self.params, strict=True)
        ]
        self.ema.optimization_step = int(state["updates"])


def check_ema_state(state: Any, source: str) -> dict[str, Tensor]:
    """The ``weights`` of a stored EMA state, checked: a dict of named tensors and an update count."""
    weights = state.get("weights") if isinstance(state, dict) else None
    if (
        not isinstance(weights, dict)
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items())
        or not isinstance(state.get("updates"), int)
    ):
        raise CheckpointError(
            f"{source}: its EMA entry is damaged (expected named tensors and an update count)"
        )
    return weights
