"""Callbacks that tell the user, in plain words, what a run achieved and where it lives."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table


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
        if trainer.log_dir:
            console.print(
                f"Logs (TensorBoard): {trainer.log_dir}   ->  tensorboard --logdir {trainer.log_dir}"
            )
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and (ckpt.last_model_path or ckpt.best_model_path):
            console.print(f"Checkpoint: {ckpt.last_model_path or ckpt.best_model_path}")
