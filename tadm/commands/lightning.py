"""``tadm fit|validate|test|predict``: LightningCLI with plug-ins loaded first and shared values linked once.

``tadm fit --config configs/quickstart.yaml [--config more.yaml] [--dotted.override value]``
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from tadm.commands.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, error_line
from tadm.config.build import link_model_arguments
from tadm.config.plugins import load_plugins
from tadm.contracts.data import ConnectsToModel
from tadm.errors import ConfigError, TadmError
from tadm.training.callbacks import checkpoint_dir
from tadm.training.lightning_module import TADMModule


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


def config_files(args: Sequence[str]) -> list[Path]:
    """The files given with ``--config F`` / ``--config=F`` / ``-c F``, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.partition("=")[2]))
    return files


def _class_paths(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every ``class_path`` string in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{key}.{k}" if key else str(k)
            if k == "class_path" and isinstance(v, str):
                yield where, v
            else:
                yield from _class_paths(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_paths(v, f"{key}[{i}]")


def _install_hint(package: str) -> str:
    """How to install ``package``: tadm's extra that declares it, when one does."""
    import importlib.metadata
    import re

    try:
        requires = importlib.metadata.requires("tadm") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    norm = package.lower().replace("_", "-")
    for line in requires:
        name = re.match(r"[A-Za-z0-9_.-]+", line)
        extra = re.search(r'extra\s*==\s*"([^"]+)"', line)
        if name and extra and extra.group(1) != "dev" and name.group(0).lower().replace("_", "-") == norm:
            return f"pip install 'tadm[{extra.group(1)}]'"
    return f"pip install {package}"


def check_config_packages(args: Sequence[str]) -> None:
    """A ``class_path`` in a --config file whose top-level package is not installed (the 8-bit optimiser's
    bitsandbytes, a plug-in package) is one line naming the file, the key and what to install, not
    jsonargparse's whole usage and a Union-subtype report. Files that cannot be read are left to it."""
    import importlib.util

    import yaml

    for path in config_files(args):
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for key, value in _class_paths(tree):
            top = value.split(".")[0]
            if "." in value and importlib.util.find_spec(top) is None:
                raise ConfigError(
                    f"{path}: {key} {value!r} needs the Python package {top!r}, which is not installed "
                    f"({_install_hint(top)})"
                )


def _run_cli(args: Sequence[str] | None) -> None:
    _show_tadm_logs()
    check_config_packages(sys.argv[1:] if args is None else args)
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
