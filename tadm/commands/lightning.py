"""``tadm fit|validate|test|predict``: LightningCLI with plug-ins loaded first and shared values linked once.

``tadm fit --config configs/quickstart.yaml [--config more.yaml] [--dotted.override value]``
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from tadm.commands.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, error_line
from tadm.config.build import link_model_arguments
from tadm.config.plugins import load_plugins
from tadm.contracts.data import ConnectsToModel
from tadm.errors import ConfigError, TadmError
from tadm.model.callbacks import checkpoint_dir
from tadm.model.module import TADMModule


class TADMCLI(LightningCLI):
    """LightningCLI with plug-ins loaded first and shared values linked once."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        link_model_arguments(parser, with_data=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TadmError, ValueError, TypeError, KeyError, FileNotFoundError) as err:
            # a value a component refuses (scale 7, a crop size that is not a multiple of it, a missing
            # folder): one line naming it, not a traceback through jsonargparse and Lightning
            raise ConfigError(f"invalid configuration: {error_line(err)}") from err
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
        """Also write the run's config next to the checkpoints (the log folder has one too).

        The checkpoint folder is set up only inside ``fit``, so it is derived here from the callback and
        the logger (``checkpoint_dir``: no collective); rank 0 writes.
        """
        if not (self.trainer.is_global_zero and self.model.run_config):
            return
        dirpath = checkpoint_dir(self.trainer)
        if dirpath:
            Path(dirpath).mkdir(parents=True, exist_ok=True)
            (Path(dirpath) / "config.yaml").write_text(self.model.run_config)


def lightning_main(args: Sequence[str] | None) -> int:
    """Run LightningCLI on ``args`` (None: it reads ``sys.argv`` itself).

    A configuration the components refuse exits 2 with one line; errors during training keep their
    tracebacks (they are bugs or data problems worth the detail). Ctrl-C before training: one line.
    """
    try:
        _run_cli(args)
    except ConfigError as err:
        print(f"tadm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tadm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _show_tadm_logs() -> None:
    """tadm's INFO lines (each rank's data share, init_from notes) on stderr, as Lightning shows its own."""
    logger = logging.getLogger("tadm")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _run_cli(args: Sequence[str] | None) -> None:
    _show_tadm_logs()
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
