"""Checkpoints that survive a full disk: each save is atomic on the checkpoint's own filesystem.

Lightning's ``TorchCheckpointIO`` writes a temp file in the system temp folder and then moves it across
filesystems: with the run's folder on a small disk, a save that meets a full disk dies with a long
traceback and leaves ``last.ckpt`` truncated (the previous good one gone). :class:`AtomicCheckpointIO`
writes a temp file beside the checkpoint, fsyncs it and renames it over the old one
(:func:`tadm.ops.files.atomic_write`); a save that fails (full disk, quota, read-only folder, a kill)
leaves the previous file intact, prints one line, and training goes on. While the most recent save has
failed it deletes no older checkpoint (``ModelCheckpoint`` removes the previous top-k / last file right
after a save: after a failed one that file is the only good one). The failures are recorded, so the
command can exit non-zero at the end of fit (:func:`checkpoint_save_failures`).

DDP: only rank 0 writes (``Strategy.save_checkpoint``), and ``Trainer.save_checkpoint`` waits at a barrier
afterwards, so an ``OSError`` never leaves ``save_checkpoint`` (a raise on rank 0 alone would hang the
other ranks); any other error (a tensor that cannot be pickled) propagates, as with Lightning's IO.

:class:`AtomicCheckpoints` installs the IO on a trainer (``TADMModule.configure_callbacks``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from tadm.ops.files import atomic_write
from tadm.training.callbacks import checkpoint_dir


def _reason(err: OSError) -> str:
    """``no space left on device``: the system's words for the errno, without the repeated path."""
    text = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


class _KeepsWriteErrors:
    """A file whose first failed write or flush is kept: torch's zip writer reports a disk that fills up
    mid-file as ``RuntimeError: ... unexpected pos`` (seen on a full tmpfs), not as the ``OSError`` it is."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as err:
            self.error = self.error or err
            raise


def _torch_save(checkpoint: dict[str, Any], path: Path) -> None:
    """Lightning's format (``torch.save`` of the dict). Through a Python file so that a failed write is the
    ``OSError`` it is (``torch.save`` to a path, or torch's zip writer over a file, turn it into a
    ``RuntimeError``)."""
    with open(path, "wb") as f:
        out = _KeepsWriteErrors(f)
        try:
            torch.save(checkpoint, out)  # type: ignore[arg-type]
        except RuntimeError as err:
            if out.error is not None:
                raise out.error from err
            raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and never raise ``OSError`` (see the module docstring).

    ``failures``: one line per failed save, as printed. ``during_training``: set by
    :class:`AtomicCheckpoints` while the fit loop runs, so the line can say that training goes on.
    Remote paths (``s3://``...) go through Lightning's own save, with the same failure handling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []
        self.last_save_failed = False
        self.during_training = False

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:  # Lightning's TypeError: this IO takes no storage options
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        local = "://" not in str(path)
        try:
            existed = os.path.isfile(path) if local else get_filesystem(path).exists(path)
        except OSError:
            existed = False
        try:
            if local:
                atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp))
            else:
                super().save_checkpoint(checkpoint, path)
        except OSError as err:
            self.last_save_failed = True
            kept = f"the previous one is intact: {path}" if existed else "there was no previous file"
            line = f"tadm: could not save checkpoint {path}: {_reason(err)}; {kept}"
            if self.during_training:
                line += "; training goes on"
            self.failures.append(line)
            print(line, file=sys.stderr, flush=True)
        else:
            self.last_save_failed = False

    def remove_checkpoint(self, path: _PATH) -> None:
        """Lightning's removal, skipped while the last save failed (the file may be the only good one)."""
        if self.last_save_failed:
            print(
                f"tadm: kept {path}: the last checkpoint save failed, so no older checkpoint is deleted",
                file=sys.stderr,
                flush=True,
            )
            return
        try:
            super().remove_checkpoint(path)
        except OSError as err:  # rank 0 alone removes: a raise here would hang the other DDP ranks
            print(
                f"tadm: could not delete old checkpoint {path}: {_reason(err)}", file=sys.stderr, flush=True
            )


def checkpoint_save_failures(trainer: L.Trainer) -> list[str]:
    """The lines of this trainer's failed checkpoint saves (rank 0 writes, so other ranks have none);
    empty when its checkpoint IO is not :class:`AtomicCheckpointIO`."""
    io = trainer.strategy.checkpoint_io
    return list(io.failures) if isinstance(io, AtomicCheckpointIO) else []


def remove_stale_temp_files(folder: str | None) -> list[Path]:
    """Delete the ``.<name>.ckpt.<random>.tmp`` files a save killed mid-file left in ``folder`` (a hard kill
    gives the writer no chance to clean up); a run starting in that folder is the only writer there."""
    if not folder or not os.path.isdir(folder):
        return []
    removed = []
    for path in Path(folder).glob(".*.ckpt.*.tmp"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass  # not ours to insist on: it only takes space
    return removed


class AtomicCheckpoints(L.Callback):
    """Makes a trainer's checkpoint saves atomic: at setup, Lightning's default ``TorchCheckpointIO`` is
    replaced by :class:`AtomicCheckpointIO`; an IO the user configured (async, cloud, a subclass) is kept,
    with a warning that tadm's atomic saves are off."""

    def __init__(self) -> None:
        self._warned = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            remove_stale_temp_files(checkpoint_dir(trainer))
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        elif not isinstance(io, AtomicCheckpointIO) and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"the trainer's checkpoint IO is {type(io).__name__}, not Lightning's default: tadm's atomic"
                " checkpoint saves are off (a full disk can leave a truncated checkpoint)"
            )

    def _set_training(self, trainer: L.Trainer, value: bool) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO):
            io.during_training = value

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_training(trainer, True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before every ModelCheckpoint's (Lightning orders those last): the final save is not "periodic"
        self._set_training(trainer, False)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._set_training(trainer, False)
