"""The real CLI on the real configs, shrunk to tiny backbones (lightning-hydra-template style)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from tadm.commands.lightning import TADMCLI
from tadm.config.plugins import load_plugins
from tadm.model.module import TADMModule
from tests.helpers import CONFIGS, TRAIN, VAL


def build_cli(args: list[str]) -> TADMCLI:
    """The objects ``tadm fit ARGS`` would build, without running anything."""
    load_plugins()
    return TADMCLI(TADMModule, L.LightningDataModule, subclass_mode_data=True, run=False, args=args)


def data_args(crop: int = 64, batch: int = 2) -> list[str]:
    """The bundled sample photos as train / val folders."""
    return [
        f"--data.init_args.train_dir={TRAIN}",
        f"--data.init_args.val_dir={VAL}",
        f"--data.init_args.crop_size={crop}",
        f"--data.init_args.batch_size={batch}",
    ]


def stage_args(
    stage: str = "enhancer",
    preset: str = "tiny-sd21",
    extra: list[str] | None = None,
    root: Path | None = None,
) -> list[str]:
    """``configs/experiments/{stage}_x16.yaml`` on a tiny backbone, a slim DFRM, CPU, no logger."""
    args = [
        "--config",
        str(CONFIGS / "experiments" / f"{stage}_x16.yaml"),
        f"--model.backbone.init_args.preset={preset}",
        "--model.backbone.init_args.gradient_checkpointing=false",
        "--model.rescaler.init_args.width=16",
        "--model.rescaler.init_args.num_resblocks=1",
        "--model.init_from=null",
        "--trainer.precision=32-true",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.logger=false",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        *data_args(crop=64, batch=1),
        "--data.init_args.num_workers=0",
    ]
    if root is not None:
        args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    return args + list(extra or [])
