"""``tadm fit|validate|test|predict``: LightningCLI with plug-ins loaded first and shared values linked once.

``tadm fit --config configs/quickstart.yaml [--config more.yaml] [--dotted.override value]``
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from tadm.commands.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    error_line,
)
from tadm.config.build import link_model_arguments
from tadm.config.plugins import load_plugins
from tadm.contracts.data import ConnectsToModel
from tadm.errors import CheckpointError, ConfigError, Preempted, TadmError, TrainingDiverged
from tadm.model.checkpoints import load_lightning_file
from tadm.ops.files import atomic_write_text
from tadm.training.callbacks import RunCheckpoint, checkpoint_dir, earlier_checkpoints
from tadm.training.checkpoint_io import checkpoint_save_failures
from tadm.training.lightning_module import TADMModule
from tadm.training.resume_options import SECTIONS, changed_options, refusal, split_changes, stored_config

log = logging.getLogger(__name__)

#: what the info line about applied changes says a subcommand is doing with the checkpoint
_DOING = {"fit": "resuming", "validate": "validating", "test": "testing", "predict": "predicting"}


class TADMCLI(LightningCLI):
    """LightningCLI with plug-ins loaded first and shared values linked once."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        link_model_arguments(parser, with_data=True)

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        """Also keep the config as typed: LightningCLI next re-parses a ``--ckpt_path``'s hyper-parameters
        over it, which would silently drop a typed ``--model.scale 32``."""
        super().parse_arguments(parser, args)
        self._typed_config = self.config.clone()
        self._stored_config = self._read_ckpt_path()

    def _read_ckpt_path(self) -> dict[str, Any] | None:
        """The run config ``--ckpt_path FILE`` stores (None without one), read by tadm before Lightning's
        own ``torch.load`` (``_parse_ckpt_path``, next): a file whose unpickling would run code, or that
        is no checkpoint, is refused here in one line naming the file (and the object), exit 2."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return None  # nothing to restore, or "last" / "hpc": Lightning's to resolve
        try:
            return stored_config(ckpt_path)
        except CheckpointError as err:
            raise ConfigError(f"--ckpt_path: {error_line(err)}") from err

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path FILE``: refuse typed options that change what the checkpoint's weights or
        restored state mean (one line naming each, exit 2), and apply the others as typed, saying which
        (:mod:`tadm.training.resume_options` sorts them)."""
        typed, sub = getattr(self, "_typed_config", None), self.subcommand
        stored = getattr(self, "_stored_config", None)  # read and checked before Lightning read the file
        if typed is None or sub is None or stored is None:
            return  # nothing to restore, "last" / "hpc" (resolved later), or not written by tadm
        self._compare_typed_options(typed[sub].get("ckpt_path"), stored)
        for section in SECTIONS:  # the typed values win over the re-parsed hyper-parameters (and their links)
            self.config[sub][section] = typed[sub][section]

    def _compare_typed_options(self, ckpt_path: str, stored: dict[str, Any]) -> None:
        """Refuse (ConfigError) the typed options that differ from ``stored`` and may not change on a resume;
        list the others, which the run applies."""
        sub = str(self.subcommand)
        try:
            typed_tree = yaml.safe_load(self._parser(sub).dump(self._typed_config[sub], skip_none=False))
        except Exception as err:  # as instantiate_classes: a config jsonargparse cannot serialise still runs
            print(f"warning: could not compare the options with {ckpt_path}'s: {err}", file=sys.stderr)
            return
        applied, refused = split_changes(changed_options(typed_tree, stored), fitting=sub == "fit")
        if refused:
            raise ConfigError(refusal(ckpt_path, refused, fitting=sub == "fit"))
        if applied and rank_zero_only.rank == 0:
            log.info("%s with changed options: %s", _DOING.get(sub, sub), ", ".join(map(str, applied)))

    def _compare_with_last(self) -> None:
        """``--ckpt_path last``: the run's newest ``last.ckpt`` (what Lightning will restore), compared with the
        typed options as a file path is. Lightning does not re-parse a ``last`` checkpoint's hyper-parameters
        over the typed config, so the typed values are already the ones the run is built with."""
        callback = self.trainer.checkpoint_callback
        if not isinstance(callback, RunCheckpoint):
            return  # Lightning's own folder rules: its "last" is resolved inside fit
        # Lightning's own choice among the candidates: the newest by modification time
        newest = max(callback._find_last_checkpoints(self.trainer), key=os.path.getmtime, default=None)
        if newest is None:
            return  # the first start of a restart script: nothing to resume, Lightning warns
        try:
            stored = stored_config(newest)
        except CheckpointError as err:
            raise ConfigError(f"--ckpt_path last ({newest}): {error_line(err)}") from err
        if stored is not None:
            self._compare_typed_options(newest, stored)

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
        """Refuse a fresh run into a folder that holds an earlier run's checkpoints; write the run's config
        next to the checkpoints (the log folder has one too).

        The checkpoint folder is set up only inside ``fit``, so it is derived here from the callback and
        the logger (``checkpoint_dir``: no collective); every process checks, rank 0 writes.
        """
        dirpath = checkpoint_dir(self.trainer)
        ckpt_path = self.config["fit"].get("ckpt_path")
        if ckpt_path == "last":
            self._compare_with_last()
        if dirpath:
            if ckpt_path is None and not self.trainer.fast_dev_run:  # a fast_dev_run saves nothing
                _refuse_replacing_a_run(dirpath)
            # Lightning warns about any file in the folder, our own config.yaml included (every run): the
            # earlier run's checkpoints are what matters, and that is refused above or resumed on purpose
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if not (self.trainer.is_global_zero and self.model.run_config):
            return
        if dirpath:
            Path(dirpath).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(dirpath) / "config.yaml", self.model.run_config)


def _refuse_replacing_a_run(dirpath: str) -> None:
    """A run's checkpoint folder is fixed (``runs/<name>/checkpoints``, no version counter: ``last.ckpt`` is
    always the newest), so a fresh run there would replace an earlier run's ``last.ckpt`` at its first save:
    days of training lost to a restart that forgot ``--ckpt_path`` (a scheduler's requeue, a rerun)."""
    earlier = earlier_checkpoints(dirpath)
    if not earlier:
        return
    newest = earlier[0]
    saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(newest)))
    more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
    raise ConfigError(
        f"'{dirpath}' holds an earlier run's checkpoints ({os.path.basename(newest)}{_step_of(newest)}, saved "
        f"{saved}{more}), "
        f"which this new run would replace. Continue that run with --ckpt_path {newest} (or --ckpt_path last, "
        "which also suits a restart script), start a separate run with another --trainer.logger.init_args.name, "
        "or move that folder away to start over"
    )


def _step_of(path: str) -> str:
    """``", step N"`` of a checkpoint, read memory-mapped without running code; empty when it cannot be read
    (the refusal names the file either way)."""
    try:
        ckpt = load_lightning_file(path, mmap=True)
        return f", step {int(ckpt['global_step'])}"
    except Exception:  # a checkpoint this line cannot read still must not be replaced
        return ""


def lightning_main(args: Sequence[str] | None) -> int:
    """Run LightningCLI on ``args`` (None: it reads ``sys.argv`` itself).

    A configuration the components refuse, a resume that would change what its checkpoint means, or a
    ``--ckpt_path`` / ``model.init_from`` file that is no usable checkpoint (one whose unpickling would run
    code included) exits 2 with one line; a run that diverged, or finished with checkpoints it could not
    write, exits 1 with one line. Other errors during training keep their tracebacks (bugs or data problems worth the detail).
    Ctrl-C before training: one line.
    """
    try:
        cli = _run_cli(args)
    except ConfigError as err:
        print(f"tadm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as err:  # model.init_from's file, read when the trainer sets the model up
        print(f"tadm: error: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:  # its message names the step, the terms and the last good checkpoint
        print(f"tadm: error: {error_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as err:  # one process: the checkpoint is saved, the message names it
        print(f"tadm: {error_line(err)}", file=sys.stderr)
        return EXIT_TERMINATED
    except SIGTERMException:  # several processes: SaveOnSigterm saved and printed on rank 0
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("tadm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    failures = checkpoint_save_failures(cli.trainer)  # a run that trained but kept nothing must not exit 0
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        print(
            f"tadm: error: {len(failures)} checkpoint save(s) failed; {'; '.join(f.removeprefix('tadm: ') for f in failures[:3])}{more}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _show_tadm_logs() -> None:
    """tadm's INFO lines (each rank's data share, init_from notes) on stderr, as Lightning shows its own."""
    logger = logging.getLogger("tadm")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the first command ran: a later
    in-process run (a notebook, a test under pytest's capture) may have replaced or closed that one."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


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


def _run_cli(args: Sequence[str] | None) -> TADMCLI:
    """Build and run the CLI; returns it, so the caller can look at the trainer after the run."""
    _show_tadm_logs()
    check_config_packages(sys.argv[1:] if args is None else args)
    load_plugins()
    return TADMCLI(
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
