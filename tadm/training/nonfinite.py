"""Non-finite steps never reach the weights: a diverged run stops with one line instead of training on NaNs.

A paper-size run is days of rented GPU time; one NaN in the loss or the gradients, applied by the
optimiser, poisons every weight, the EMA and every later checkpoint, while the run goes on and exits 0.
:class:`NonFiniteGuard` is the bookkeeping the training module does once per optimiser step: the loss
terms of the step's micro-batches, the gradients of the trained parameters, one decision every DDP rank
shares (so all ranks skip or stop together: no rank waits in a collective the others left), a count of
steps skipped in a row and in all. :func:`non_finite_tensors` is the check before every checkpoint save.

Under fp16 with a gradient scaler, overflowing gradients are the scaler's business: it skips that step
and lowers its scale by design, so only a non-finite *loss* counts there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor


class NonFiniteGuard:
    """Per optimiser step: were the loss and the gradients finite on every rank? Counts skips in a row.

    Args:
        max_in_a_row: stop (the caller raises) once this many optimiser steps in a row were not finite.
    """

    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self.step_skipped = False
        #: per micro-batch of the step: its term names and whether each was finite (a tensor, on the device)
        self._losses: list[tuple[list[str], Tensor]] = []
        self._gradients_finite = True

    def note_loss(self, terms: Mapping[str, Tensor], loss: Tensor) -> None:
        """Keep whether each loss term of this micro-batch is finite, on the device: no host sync per
        micro-batch (the names are read back only for a step that is skipped)."""
        values = torch.stack([t.detach().float().sum() for t in (*terms.values(), loss)])
        self._losses.append(([*terms, "loss"], torch.isfinite(values)))

    def check_step(
        self,
        params: Iterable[torch.nn.Parameter],
        agree: Callable[[bool], bool],
        check_gradients: bool = True,
    ) -> bool:
        """True when the step may update the weights. ``agree(ok)`` is True only if every rank's ``ok`` is
        (``Strategy.reduce_boolean_decision(ok, all=True)``); gradients are checked unless a grad scaler
        owns that check. Call once per optimiser step, after backward."""
        checks = [finite.all() for _, finite in self._losses]
        ok = bool(torch.stack(checks).all()) if checks else True
        if ok and check_gradients:  # a NaN loss names the loss, not its gradients
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                ok = self._gradients_finite = bool(
                    torch.stack([torch.isfinite(g).all() for g in grads]).all()
                )
        ok = agree(ok)
        self.step_skipped = not ok
        if ok:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total += 1
        return ok

    def bad_terms(self) -> list[str]:
        """The non-finite terms of this step on this rank, in order (``gradients`` for the gradients; empty
        when only another rank's were). Reads the flags back from the device: call it for a skipped step."""
        bad: list[str] = []
        for names, finite in self._losses:
            bad += [n for n, f in zip(names, finite.tolist(), strict=True) if not f and n not in bad]
        if not bad and not self._gradients_finite:
            bad.append("gradients")
        return bad

    def end_step(self) -> None:
        """Forget the step's terms (after the optimiser step, skipped or not)."""
        self._losses = []
        self._gradients_finite = True

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.in_a_row = int(state.get("in_a_row", 0))
        self.total = int(state.get("total", 0))


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """(name, count of NaN/inf values) of every floating-point tensor that has any, in order."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append((name, n))
    return bad


def describe_non_finite(bad: list[tuple[str, int]], most: int = 3) -> str:
    """``1,405,087 non-finite values in 12 tensors (rescaler.a: 10, ...)`` for an error line."""
    total = sum(n for _, n in bad)
    shown = ", ".join(f"{name}: {n:,}" for name, n in bad[:most])
    more = ", ..." if len(bad) > most else ""
    return f"{total:,} non-finite values in {len(bad)} tensor(s) ({shown}{more})"
