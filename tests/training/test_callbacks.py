"""tadm.training.callbacks on one process: the final step is saved, checkpoints live beside the logger's
run, and the report needs no collective (the DDP runs are in tests/training/test_ddp_webdataset.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from tadm.training.callbacks import RoundTripReport, RunCheckpoint, checkpoint_dir


class Tiny(L.LightningModule):
    """One weight; validation logs what RoundTripReport prints."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.scale = 16

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for name in ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "lr_psnr"):
            self.log(f"val/{name}", 20.0 + self.w.detach(), batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int) -> DataLoader:
    return DataLoader(torch.randn(batches, 3), batch_size=1)


def _trainer(tmp: Path, callbacks: list[L.Callback], logger: bool = True, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp / "logs", name="run") if logger else False,
        callbacks=callbacks,
        default_root_dir=tmp / "root",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["global_step"])


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_holds_the_final_step(tmp_path: Path, save_last: bool | str) -> None:
    """6 steps with a checkpoint every 4: Lightning alone leaves last.ckpt at step 4."""
    ckpt = RunCheckpoint(every_n_train_steps=4, save_last=save_last)
    trainer = _trainer(tmp_path, [ckpt], max_steps=6)
    trainer.fit(Tiny(), train_dataloaders=_loader(10))
    folder = tmp_path / "logs" / "run" / "checkpoints"  # beside the logger's runs (version_0)
    assert ckpt.dirpath == str(folder)
    assert _step(folder / "last.ckpt") == 6
    assert not (folder / "last.ckpt").is_symlink()
    assert _step(folder / "epoch=0-step=4.ckpt") == 4  # the linked checkpoint is not overwritten
    assert ckpt.last_model_path == str(folder / "last.ckpt")


def test_no_extra_save_on_a_boundary_or_without_save_last(tmp_path: Path) -> None:
    on_boundary = RunCheckpoint(every_n_train_steps=3, save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path / "a", [on_boundary], max_steps=6)
    trainer.fit(Tiny(), train_dataloaders=_loader(10))
    files = sorted(p.name for p in Path(on_boundary.dirpath).glob("*.ckpt"))
    assert files == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    no_last = RunCheckpoint(every_n_train_steps=4)
    trainer = _trainer(tmp_path / "b", [no_last], max_steps=6)
    trainer.fit(Tiny(), train_dataloaders=_loader(10))
    assert sorted(p.name for p in Path(no_last.dirpath).glob("*.ckpt")) == ["epoch=0-step=4.ckpt"]


def test_checkpoint_folder_follows_the_logger_or_the_root(tmp_path: Path) -> None:
    """Known before fit (the CLI writes config.yaml there) and equal to where fit saves."""
    with_logger = _trainer(tmp_path, [RunCheckpoint(save_last=True)], max_steps=1)
    assert checkpoint_dir(with_logger) == str(tmp_path / "logs" / "run" / "checkpoints")
    without = _trainer(tmp_path, [RunCheckpoint(save_last=True)], logger=False, max_steps=1)
    assert checkpoint_dir(without) == str(tmp_path / "root" / "checkpoints")
    without.fit(Tiny(), train_dataloaders=_loader(2))
    assert _step(tmp_path / "root" / "checkpoints" / "last.ckpt") == 1
    explicit = _trainer(tmp_path, [RunCheckpoint(dirpath=tmp_path / "here")], max_steps=1)
    assert checkpoint_dir(explicit) == str(tmp_path / "here")
    # Lightning's own default sits in the version folder, decided only at setup
    assert checkpoint_dir(_trainer(tmp_path, [ModelCheckpoint()], max_steps=1)) is None
    assert checkpoint_dir(_trainer(tmp_path, [], enable_checkpointing=False, max_steps=1)) is None


def test_report_uses_no_collective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rank 0 prints alone: ``trainer.log_dir`` (a broadcast) would fail or hang a DDP run there."""

    log_dir = L.Trainer.log_dir

    def collective(self: L.Trainer) -> str | None:
        if self.global_step > 0:  # past setup, where Lightning itself calls it on every rank
            raise AssertionError("trainer.log_dir is a broadcast: called on rank 0 alone, DDP fails")
        return log_dir.fget(self)

    monkeypatch.setattr(L.Trainer, "log_dir", property(collective))
    ckpt = RunCheckpoint(save_last=True)
    trainer = _trainer(tmp_path, [ckpt, RoundTripReport()], max_steps=3, limit_val_batches=1)
    trainer.fit(Tiny(), train_dataloaders=_loader(3), val_dataloaders=_loader(1))
    out = capsys.readouterr().out
    assert "bicubic down + up" in out and "step 3)" in out
    assert f"Logs (TensorBoard): {tmp_path / 'logs' / 'run' / 'version_0'}" in out
    assert f"Checkpoint: {tmp_path / 'logs' / 'run' / 'checkpoints' / 'last.ckpt'}" in out
