"""The EMA's life in a run, as a callback: started or resumed when fitting begins, updated after every
optimiser step, swapped in to validate / test / predict, and swapped out again even when a run stops
with an exception.

The averaging itself is :class:`tadm.model.ema.TrainedEMA`; the module holds it (``pl_module.ema``, with
``pl_module.ema_decay`` / ``ema_start_step`` / ``_ema_pending`` from a checkpoint being loaded) because its
checkpoint hooks store it. ``TADMModule.configure_callbacks`` adds this callback to every trainer, so a
user's own ``Trainer`` gets it too.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from tadm.model.ema import TrainedEMA

log = logging.getLogger(__name__)


def new_ema(pl_module: Any, decay: float, start_step: int) -> TrainedEMA:
    """An EMA of the module's trained tensors, continuing a loaded checkpoint's when there is one."""
    ema = TrainedEMA(pl_module.model.named_trainable_parameters(), decay, start_step)
    if pl_module._ema_pending is not None:
        ema.load_state_dict(pl_module._ema_pending, "the checkpoint being resumed")
        pl_module._ema_pending = None
    return ema


class EMAWeights(L.Callback):
    """Keeps ``pl_module.ema`` (see the module docstring): every hook is a no-op without an EMA.

    Updates once per optimiser step (not per batch under gradient accumulation; not for a step the AMP
    grad scaler skips), from weights every DDP rank shares, so the ranks' EMAs stay identical. The update
    is a post-step hook on the optimiser (``torch.optim.Optimizer.register_step_post_hook``): it runs
    before any callback's ``on_train_batch_end`` (where ``ModelCheckpoint`` saves), whatever the order of
    the callbacks, so a checkpoint of step N holds the EMA of step N and a resumed run continues it exactly.
    """

    def __init__(self) -> None:
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- fitting
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Start the EMA from the current weights, or continue the resumed checkpoint's."""
        swap_out(pl_module)  # an earlier run stopped with the averages swapped in: train the raw weights
        self._remove_hooks()
        if pl_module.ema_decay is None:
            if pl_module._ema_pending is not None:
                log.warning("the resumed checkpoint has an EMA, but model.ema_decay is null: it is dropped")
                pl_module._ema_pending = None
            pl_module.ema = None
            return
        pl_module.ema = new_ema(pl_module, pl_module.ema_decay, pl_module.ema_start_step)

        def update(optimizer: Any, args: Any, kwargs: Any) -> None:
            skipped = getattr(getattr(pl_module, "nonfinite", None), "step_skipped", False)
            if pl_module.ema is not None and not skipped:  # a skipped non-finite step left the weights alone
                pl_module.ema.update()

        self._hooks = [opt.register_step_post_hook(update) for opt in trainer.optimizers]

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---------------------------------------------------------------- evaluating
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_out(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_in(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_out(pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_in(pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        swap_out(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Validation, test and predict run with the averages in the parameters; an exception (or Ctrl+C)
        mid-epoch skips the epoch's end, and a module used again in the same process (a notebook, a second
        ``trainer.fit``) would carry on from the averages with its trained weights lost."""
        swap_out(pl_module)
        self._remove_hooks()


def swap_in(pl_module: Any) -> None:
    """Evaluate with the EMA when there is one (fitting, or a checkpoint that has one)."""
    if pl_module.ema is None and pl_module._ema_pending is not None:  # validate/test/predict --ckpt_path
        pending = pl_module._ema_pending
        decay, start = float(pending.get("decay", 0.999)), int(pending.get("start_step", 0))
        pl_module.ema = new_ema(pl_module, decay, start)
    if pl_module.ema is not None:
        pl_module.ema.swap_in()


def swap_out(pl_module: Any) -> None:
    """Put the raw weights back (a no-op when they are in)."""
    if pl_module.ema is not None:
        pl_module.ema.swap_out()
