"""SIGTERM (Kubernetes, most schedulers, ``kill``): save a resumable checkpoint at a step boundary and stop.

Lightning notes a SIGTERM (``trainer.received_sigterm``) but, on one process, acts on it only at the end
of the epoch, and then raises without saving: an epoch of a streamed data set can be hours, and a
preempted job usually gets seconds. With several processes Lightning's own per-step broadcast raises
``SIGTERMException`` on every rank at the start of the next step; the save happens there, on every rank
together (the save is a collective). SLURM's SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) stays Lightning's
auto-requeue path.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tadm.errors import Preempted


def preemption_checkpoint_path(trainer: L.Trainer) -> str:
    """``last.ckpt`` in the run's checkpoint folder (what a resume names anyway); without a checkpoint
    callback, ``preempted.ckpt`` in the trainer's root folder."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        return os.path.join(str(ckpt.dirpath), ModelCheckpoint.CHECKPOINT_NAME_LAST + ckpt.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "preempted.ckpt")


class SaveOnSigterm(L.Callback):
    """On SIGTERM: a checkpoint at the next step boundary, then one line naming it; ``tadm fit`` exits with
    status 143 (128 + SIGTERM), so a scheduler that restarts the job resumes with ``--ckpt_path``."""

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        # one process: Lightning would act only when the epoch ends; several: it raises SIGTERMException on
        # every rank at the next step's start (a point all ranks reach together), handled below
        if trainer.world_size == 1 and getattr(trainer, "received_sigterm", False):
            raise Preempted(self._save(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.saved is None and trainer.state.fn == "fit":
            message = self._save(trainer)
            if trainer.is_global_zero:
                print(f"tadm: {message}", file=sys.stderr, flush=True)

    def _save(self, trainer: L.Trainer) -> str:
        path = preemption_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        return (
            f"SIGTERM received: saved a resumable checkpoint at step {trainer.global_step} to {path}; "
            f"resume with --ckpt_path {path}"
        )
