"""A callback that sends this process a signal at a chosen step: a scheduler's SIGTERM, in-process."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SignalAtStep(L.Callback):
    """``os.kill(os.getpid(), signum)`` once, after the optimiser step that makes ``global_step == step``.

    Args:
        step: the global step after which the signal is sent.
        signum: the signal number (default SIGTERM).
    """

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.signum = signum
        self.sent = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)
