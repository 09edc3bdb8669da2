"""tadm.training.checkpoint_io: a checkpoint save that meets a full disk (simulated: ``torch.save`` writes
half the file, then the disk is full) or a read-only folder keeps the previous file, prints one line,
is recorded, deletes no older checkpoint, and training goes on."""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from tadm.training.callbacks import RunCheckpoint
from tadm.training.checkpoint_io import AtomicCheckpointIO, AtomicCheckpoints, checkpoint_save_failures


def _full_disk(monkeypatch: pytest.MonkeyPatch, when: Callable[[dict[str, Any]], bool]) -> None:
    """``torch.save`` of a checkpoint that ``when`` picks writes half its bytes, then hits ENOSPC."""
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not (isinstance(obj, dict) and when(obj)):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
            f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tadm:")]


def test_a_full_disk_keeps_the_previous_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt_io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt_io.save_checkpoint({"w": torch.arange(4.0), "global_step": 1}, last)
    first = last.read_bytes()
    assert torch.equal(torch.load(last, weights_only=True)["w"], torch.arange(4.0))  # Lightning's format
    assert ckpt_io.failures == [] and _err_lines(capsys) == []

    _full_disk(monkeypatch, lambda c: c["global_step"] == 2)
    ckpt_io.save_checkpoint({"w": torch.zeros(4), "global_step": 2}, last)  # no raise: DDP would hang
    assert last.read_bytes() == first
    assert os.listdir(last.parent) == ["last.ckpt"]  # the half-written temp file is gone
    line = (
        f"tadm: could not save checkpoint {last}: no space left on device; the previous one is intact: {last}"
    )
    assert _err_lines(capsys) == [line]
    assert ckpt_io.failures == [line] and ckpt_io.last_save_failed

    fresh = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    ckpt_io.during_training = True
    ckpt_io.save_checkpoint({"global_step": 2}, fresh)
    assert not fresh.exists() and os.listdir(last.parent) == ["last.ckpt"]
    assert _err_lines(capsys) == [
        f"tadm: could not save checkpoint {fresh}: no space left on device; there was no previous file;"
        " training goes on"
    ]
    assert len(ckpt_io.failures) == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: ENOSPC)")
def test_the_kernels_full_disk_error_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ENOSPC, from the kernel: the temp file's writes go to /dev/full. ``torch.save`` to a path
    would turn it into a RuntimeError (a traceback); through a Python file it stays an OSError."""
    import tadm.training.checkpoint_io as checkpoint_io

    real_open = open

    def full(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return real_open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"good")
    monkeypatch.setattr(checkpoint_io, "open", full, raising=False)
    ckpt_io = AtomicCheckpointIO()
    ckpt_io.save_checkpoint({"w": torch.zeros(100_000)}, last)
    assert last.read_bytes() == b"good" and os.listdir(tmp_path) == ["last.ckpt"]
    assert ckpt_io.failures == [
        f"tadm: could not save checkpoint {last}: no space left on device; the previous one is intact: {last}"
    ]
    assert len(_err_lines(capsys)) == 1


def test_the_temp_file_is_written_in_the_destination_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename within one filesystem is atomic; a move from the system temp folder is a copy."""
    renames: list[tuple[Path, Path]] = []
    replace = os.replace

    def spy(src: str, dst: str | os.PathLike[str]) -> None:
        renames.append((Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, str(last))
    assert len(renames) == 1
    src, dst = renames[0]
    assert dst == last and src.parent == last.parent
    assert src.name.startswith(".last.ckpt.") and src.name.endswith(".tmp")
    assert torch.load(last, weights_only=True) == {"global_step": 3}


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into a 0o555 folder")
def test_a_read_only_folder_keeps_the_previous_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt_io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    ckpt_io.save_checkpoint({"global_step": 1}, last)
    first = last.read_bytes()
    tmp_path.chmod(0o555)
    try:
        ckpt_io.save_checkpoint({"global_step": 2}, last)
    finally:
        tmp_path.chmod(0o755)
    assert last.read_bytes() == first and os.listdir(tmp_path) == ["last.ckpt"]
    line = f"tadm: could not save checkpoint {last}: permission denied; the previous one is intact: {last}"
    assert _err_lines(capsys) == [line] and ckpt_io.failures == [line]


def test_other_errors_propagate_and_leave_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only OSError is a disk problem; a bug (an object that cannot be pickled) still raises."""

    def broken(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise TypeError("cannot pickle 'generator' object")

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"good")
    monkeypatch.setattr(torch, "save", broken)
    ckpt_io = AtomicCheckpointIO()
    with pytest.raises(TypeError, match="cannot pickle"):
        ckpt_io.save_checkpoint({"global_step": 1}, last)
    assert last.read_bytes() == b"good" and os.listdir(tmp_path) == ["last.ckpt"]
    assert ckpt_io.failures == []


class Tiny(L.LightningModule):
    """One weight, trained a few CPU steps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp: Path, callbacks: list[L.Callback], steps: int, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        **kwargs,
    )
    trainer.fit(Tiny(), train_dataloaders=DataLoader(torch.randn(10, 3), batch_size=1))
    return trainer


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["global_step"])


def test_a_fit_goes_on_after_a_failed_save_and_deletes_no_older_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Saves every 2 steps, top-1 plus last.ckpt; the disk is full at step 4 only. Lightning would remove
    step 2's file right after step 4's (failed) save: it is kept, and training reaches step 6."""
    _full_disk(monkeypatch, lambda c: c.get("global_step") == 4)
    folder = tmp_path / "checkpoints"
    ckpt = RunCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=1, save_last=True)
    trainer = _fit(tmp_path, [AtomicCheckpoints(), ckpt], steps=6)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.global_step == 6
    assert sorted(os.listdir(folder)) == ["epoch=0-step=2.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert _step(folder / "epoch=0-step=2.ckpt") == 2  # the only good file while step 4 failed
    assert _step(folder / "last.ckpt") == 6
    step4, last = folder / "epoch=0-step=4.ckpt", folder / "last.ckpt"
    failures = [
        f"tadm: could not save checkpoint {step4}: no space left on device; there was no previous file;"
        " training goes on",
        f"tadm: could not save checkpoint {last}: no space left on device; the previous one is intact: {last};"
        " training goes on",
    ]
    assert checkpoint_save_failures(trainer) == failures
    lines = _err_lines(capsys)
    assert [line for line in lines if "could not save" in line] == failures
    assert any(line.startswith(f"tadm: kept {folder / 'epoch=0-step=2.ckpt'}") for line in lines)


def test_a_failed_final_save_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The save of the final step (after training) fails: last.ckpt stays at step 2 and says nothing of
    training going on."""
    _full_disk(monkeypatch, lambda c: c.get("global_step") == 3)
    folder = tmp_path / "checkpoints"
    ckpt = RunCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True)
    trainer = _fit(tmp_path, [AtomicCheckpoints(), ckpt], steps=3)
    last = folder / "last.ckpt"
    assert _step(last) == 2 and sorted(os.listdir(folder)) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    line = (
        f"tadm: could not save checkpoint {last}: no space left on device; the previous one is intact: {last}"
    )
    assert checkpoint_save_failures(trainer) == [line]
    assert [x for x in _err_lines(capsys) if "could not save" in x] == [line]


class OwnIO(TorchCheckpointIO):
    """A user's own checkpoint IO."""


def test_a_users_own_checkpoint_io_is_left_alone(tmp_path: Path) -> None:
    own = OwnIO()
    with pytest.warns(UserWarning, match="OwnIO.*atomic checkpoint saves are off"):
        trainer = _fit(tmp_path, [AtomicCheckpoints()], steps=1, plugins=[own], enable_checkpointing=False)
    assert trainer.strategy.checkpoint_io is own
    assert checkpoint_save_failures(trainer) == []
    default = _fit(tmp_path, [], steps=1, enable_checkpointing=False)  # without the callback: Lightning's
    assert type(default.strategy.checkpoint_io) is TorchCheckpointIO
    assert checkpoint_save_failures(default) == []


@pytest.mark.slow  # mounts a filesystem (root only) and trains the quickstart for two short epochs
def test_a_real_full_filesystem_gives_one_line_exit_1_and_whole_checkpoints(tmp_path: Path) -> None:
    """The issue's setting: the log folder on a 26 MB filesystem, the 17 MB quickstart checkpoint. The first
    epoch's top-1 checkpoint fits, its ``last.ckpt`` does not; the second epoch's top-1 does not either, so
    the first one must stay. One line per failed save, no traceback, exit status 1, and every ``.ckpt`` left
    loads whole."""
    import shutil
    import subprocess

    from tests.helpers import CONFIGS, REPO
    from tests.helpers.cli import data_args

    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=26m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        args = [
            sys.executable, "-m", "tadm", "fit", "--config", str(CONFIGS / "quickstart.yaml"),
            *data_args(crop=64, batch=2), "--data.init_args.train_repeats=1",
            "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={mount}",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        err = done.stderr
        assert done.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        failed = [x for x in err.splitlines() if x.startswith("tadm: could not save checkpoint")]
        assert len(failed) == 3 and all("no space left on device" in x for x in failed), failed
        folder = mount / "quickstart" / "checkpoints"
        kept = sorted(p.name for p in folder.glob("*.ckpt"))
        assert kept == ["epoch=0-step=3.ckpt"], kept
        assert torch.load(folder / kept[0], weights_only=True)["global_step"] == 3
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_save_killed_mid_file_leaves_a_temp_file_the_next_run_removes(tmp_path: Path) -> None:
    """A SIGKILL during a save leaves ``.last.ckpt.<random>.tmp`` (the kill-anywhere harness saw 8.8 MB of
    them); the next run in that folder deletes them at setup and touches nothing else."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = [folder / ".last.ckpt.abc123.tmp", folder / ".epoch=0-step=2.ckpt.x9.tmp"]
    kept = [folder / "last.ckpt", folder / ".hidden.tmp", folder / "notes.ckpt.tmp"]
    for path in (*stale, *kept):
        path.write_bytes(b"x")
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=folder)],
        accelerator="cpu",
    )
    AtomicCheckpoints().setup(trainer, L.LightningModule(), "fit")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
