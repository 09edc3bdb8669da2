"""Callbacks: where a run keeps its checkpoints, and what it achieved in plain words.

Every callback here is safe under DDP on any number of nodes: a hook runs on every rank, and nothing
that is a collective (``trainer.log_dir``, ``strategy.broadcast``, ``trainer.save_checkpoint``) sits
behind an ``is_global_zero`` check; rank 0 alone prints.
"""

from __future__ import annotations

import math
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from rich.table import Table


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that keeps checkpoints beside the run's logs and saves the last step.

    Every argument is ``ModelCheckpoint``'s. Two differences:

    - ``dirpath`` unset: the checkpoints go to ``<logger save_dir>/<logger name>/checkpoints`` (the
      TensorBoard logs of each run go to ``<save_dir>/<name>/version_N``), so
      ``--trainer.logger.init_args.save_dir`` or ``name`` moves logs and checkpoints together, and the
      path does not depend on the run's version: ``runs/<name>/checkpoints/last.ckpt``. Without a logger:
      ``<trainer.default_root_dir>/checkpoints``.
    - With ``save_last``, ``last.ckpt`` is written when training ends if the last save is older than the
      final step (``max_steps`` off a checkpoint / validation boundary, early stopping).

    Both are DDP-safe: every rank derives the same folder from the logger's settings (no collective), and
    every rank calls ``trainer.save_checkpoint`` (rank 0 writes).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_checkpoint_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """``--ckpt_path last`` is resolved before ``setup``: look in the run's folder, not in Lightning's
        default one (which would find nothing and start the run over, replacing its ``last.ckpt``)."""
        if self.dirpath is None:
            self.dirpath = run_checkpoint_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return  # nothing new since the last save (or not fitting, fast_dev_run)
        candidates = self._monitor_candidates(trainer)
        if self.save_last == "link":
            # last.ckpt links to the newest saved checkpoint, older than this step: replace it by a file
            # (writing through the link would overwrite that older checkpoint)
            link = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            if trainer.is_global_zero and os.path.islink(link):
                os.remove(link)
            trainer.strategy.barrier("tadm_last_checkpoint")
            self._last_checkpoint_saved = ""
        self._save_last_checkpoint(trainer, candidates)
        rank_zero_info(f"Saved the final step {trainer.global_step} to {self.last_model_path}")


def run_checkpoint_dir(trainer: L.Trainer) -> str:
    """``<save_dir>/<name>/checkpoints`` of the trainer's first logger (``RunCheckpoint``'s default)."""
    if not trainer.loggers:
        return os.path.join(trainer.default_root_dir, "checkpoints")
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    return os.path.join(save_dir, str(logger.name), "checkpoints")


def checkpoint_dir(trainer: L.Trainer) -> str | None:
    """The folder the trainer's checkpoint callback will write to, known before ``fit`` sets it up.

    No collective: call it on any rank. None without a checkpoint callback, or for a plain
    ``ModelCheckpoint`` without ``dirpath`` (Lightning puts it under the logger's version folder, which
    is decided only at setup).
    """
    ckpt = trainer.checkpoint_callback
    if not isinstance(ckpt, ModelCheckpoint):
        return None
    if ckpt.dirpath is not None:
        return str(ckpt.dirpath)
    return run_checkpoint_dir(trainer) if isinstance(ckpt, RunCheckpoint) else None


def earlier_checkpoints(dirpath: str | os.PathLike[str]) -> list[str]:
    """The finished checkpoints (``*.ckpt``) in a run's checkpoint folder, newest first: what a fresh run
    into that folder would replace (``last.ckpt`` at its first save). Temp files of an interrupted save are
    not checkpoints (``.<name>.<random>.tmp``)."""
    try:
        found = [e for e in os.scandir(dirpath) if e.name.endswith(".ckpt") and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e.path for e in sorted(found, key=lambda e: e.stat().st_mtime, reverse=True)]


def newest_saved_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint callback's ``last`` (else best) checkpoint if it is on disk: a path whose first save
    failed (a full disk) is not one to resume from."""
    ckpt = trainer.checkpoint_callback
    if not isinstance(ckpt, ModelCheckpoint):
        return None
    return next((p for p in (ckpt.last_model_path, ckpt.best_model_path) if p and os.path.exists(p)), None)


def _log_dir(trainer: L.Trainer) -> str | None:
    """The first logger's folder, read on this rank alone (``trainer.log_dir`` is a broadcast, which
    fails or hangs when only rank 0 calls it)."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    return getattr(logger, "log_dir", None) or logger.save_dir


def _value(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if v is not None else math.nan


class RoundTripReport(L.Callback):
    """Prints the validation round trip (HR -> 8-bit LR -> HR) next to bicubic down + up.

    Printed after ``fit`` (from the last validation) and after ``validate``, with the log folder
    and the checkpoint path, so a user sees at once whether the rescaler beats the baseline.
    """

    def __init__(self, prefix: str = "val") -> None:
        super().__init__()
        self.prefix = prefix

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "after training")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._report(trainer, pl_module, "validation")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        # rank 0 prints alone, so nothing below may be a collective: the other ranks have moved on
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        p = self.prefix
        if f"{p}/psnr_y" not in m:
            return
        scale = getattr(pl_module, "scale", "?")
        n = sum(getattr(trainer, "num_val_batches", None) or [0])
        step = f", step {trainer.global_step}" if when == "after training" else ""
        table = Table(title=f"x{scale} round trip on {n} held-out batch(es) ({when}{step})")
        for col in ("", "PSNR-Y (dB)", "SSIM-Y"):
            table.add_column(col, justify="right")
        table.add_row("this model", f"{_value(m, f'{p}/psnr_y'):.2f}", f"{_value(m, f'{p}/ssim_y'):.4f}")
        table.add_row(
            "bicubic down + up",
            f"{_value(m, f'{p}/bicubic_psnr_y'):.2f}",
            f"{_value(m, f'{p}/bicubic_ssim_y'):.4f}",
        )
        console = Console(width=100)
        console.print(table)
        gain = _value(m, f"{p}/psnr_y") - _value(m, f"{p}/bicubic_psnr_y")
        verdict = "beats" if gain > 0 else "does NOT beat"
        console.print(
            f"The model {verdict} bicubic by {gain:+.2f} dB PSNR-Y on these images. "
            f"Its 8-bit LR image is {_value(m, f'{p}/lr_psnr'):.2f} dB PSNR from the bicubic LR image."
        )
        # paths on one line each, never wrapped (they are copied into the next command)
        log_dir = _log_dir(trainer)
        if isinstance(trainer.logger, TensorBoardLogger):
            console.print(
                f"Logs (TensorBoard): {log_dir}   ->  tensorboard --logdir {log_dir}", soft_wrap=True
            )
        elif log_dir:
            console.print(f"Logs: {log_dir}", soft_wrap=True)
        saved = newest_saved_checkpoint(trainer)
        if saved:
            console.print(f"Checkpoint: {saved}", soft_wrap=True)
