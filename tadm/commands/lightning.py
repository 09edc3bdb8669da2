"""``tadm fit|validate|test|predict``: LightningCLI with plug-ins loaded first and shared values linked once.

``tadm fit --config configs/quickstart.yaml [--config more.yaml] [--dotted.override value]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from tadm.config.build import link_model_arguments
from tadm.config.plugins import load_plugins
from tadm.contracts.data import ConnectsToModel
from tadm.model.module import TADMModule


class TADMCLI(LightningCLI):
    """LightningCLI with plug-ins loaded first and shared values linked once."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        link_model_arguments(parser, with_data=True)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if isinstance(self.datamodule, ConnectsToModel):  # hand the data module the model's facts
            model = self.model
            self.datamodule.connect(model.backbone.backbone_id, model.rescaler.space == "latent")
        # Keep the full config with every checkpoint (module-typed args are not rebuilt from hparams).
        cfg = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        try:
            self.model.run_config = self._parser(self.subcommand).dump(cfg, skip_none=False)
        except Exception as err:  # a config jsonargparse cannot serialise still trains
            print(f"warning: could not serialise the run config into checkpoints: {err}", file=sys.stderr)

    def before_fit(self) -> None:
        """Also write the run's config next to the checkpoints (the log folder has one too)."""
        ckpt = self.trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath and self.model.run_config and self.trainer.is_global_zero:
            Path(dirpath).mkdir(parents=True, exist_ok=True)
            (Path(dirpath) / "config.yaml").write_text(self.model.run_config)


def lightning_main(args: Sequence[str] | None) -> int:
    """Run LightningCLI on ``args`` (None: it reads ``sys.argv`` itself)."""
    load_plugins()
    TADMCLI(
        TADMModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "tadm: extreme image rescaling with diffusion priors. Also: `tadm list`, "
            "`tadm shard`, `tadm downscale`, `tadm upscale`, `tadm evaluate`, `tadm export`."
        },
    )
    return 0
