"""Callbacks a test adds to a real ``tadm fit`` (``--trainer.callbacks``) to see what training did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class BatchLog(L.Callback):
    """Writes ``OUT/rank<r>.json``: per training batch its global step, epoch, index, size and the LR it ran
    at, so a test counts the samples every epoch served across the ranks of a (DDP) run."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        size = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "idx": batch_idx,
                "size": size,
                "lr": lr,
            }
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def batch_log(out: Path) -> list[dict[str, Any]]:
    """Every rank's rows of a :class:`BatchLog` folder, each with its ``rank``, in (step, rank) order."""
    rows = []
    for path in sorted(out.glob("rank*.json")):
        rank = int(path.stem.removeprefix("rank"))
        rows += [{**row, "rank": rank} for row in json.loads(path.read_text())]
    return sorted(rows, key=lambda r: (r["step"], r["rank"]))


def samples_per_epoch(rows: list[dict[str, Any]]) -> dict[int, int]:
    """Samples served in each epoch, all ranks together."""
    served: dict[int, int] = {}
    for row in rows:
        served[row["epoch"]] = served.get(row["epoch"], 0) + row["size"]
    return served
