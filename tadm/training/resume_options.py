"""Which options may change when a run restarts from a checkpoint (``--ckpt_path``), and which may not.

LightningCLI re-parses a checkpoint's hyper-parameters over the config as typed, so a ``--model.scale 32``
given to a resumed x16 run used to vanish without a word. Here the config as typed is compared with the
config the checkpoint stores (``checkpoint["tadm"]["config"]``, :mod:`tadm.model.checkpoints`), option by
option, and every difference is either

- **applied**: safe to change on a resume (the trainer, the data, loss weights, logging, runtime switches
  such as gradient checkpointing), or
- **refused**: it changes the architecture or what the restored weights or training state mean (scale,
  stage, the backbone and its weights, rescaler, aligner, enhancer; when fitting also the optimiser, the
  LR schedule and the EMA, whose state Lightning restores over whatever was typed).

Options only one of the two configs has (a newer tadm's new options) are not compared. Pure functions on
parsed YAML trees, so the CLI stays thin and the rules are unit-tested (``tests/training/test_resume_options.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tadm.config.build import parse_run_config
from tadm.model.checkpoints import META_KEY, load_lightning_file

#: the config sections that are compared (``seed_everything``, ``ckpt_path``, ``config`` are not options
#: of what a checkpoint restores)
SECTIONS = ("model", "data", "trainer")

#: ``model.<arg>`` (TADMModule's arguments) that are safe to change on a resume: losses, logging, evaluation
APPLIED_MODEL_ARGS = frozenset(
    {
        "loss_weights",
        "distance",
        "init_from",  # loaded first, then the checkpoint restores over it
        "num_log_images",
        "eval_tiling",
        "color_fix",
        "max_nonfinite_steps",
    }
)
#: ``model.<arg>`` that change the architecture or what the stored weights mean
ARCHITECTURE_MODEL_ARGS = frozenset(
    {"scale", "stage", "backbone", "rescaler", "aligner", "enhancer", "aligner_latents"}
)
#: ``model.<arg>`` whose state ``fit`` restores from the checkpoint (the optimiser with its lr, the LR
#: scheduler, the EMA): a typed value would be overridden, so ``fit`` refuses a change; evaluation ignores it
RESTORED_STATE_MODEL_ARGS = frozenset(
    {"optimizer", "lr_scheduler", "lr_scheduler_interval", "ema_decay", "ema_start_step"}
)
#: backbone ``init_args`` that only change how the frozen backbone runs, not which weights it holds
BACKBONE_RUNTIME_ARGS = frozenset({"gradient_checkpointing", "local_files_only", "dtype", "sample_latent"})
#: mappings that are one option's value (any keys), compared whole rather than key by key
VALUE_OPTIONS = frozenset({"model.loss_weights"})

Kind = Literal["applied", "architecture", "restored_state"]


@dataclass(frozen=True)
class Change:
    """One option whose typed value differs from the checkpoint's stored one."""

    key: str  # dotted, as typed on the command line: ``model.rescaler.init_args.width``
    stored: Any
    typed: Any

    def __str__(self) -> str:
        return f"{self.key} {show(self.stored)} -> {show(self.typed)}"


def show(value: Any, most: int = 60) -> str:
    """A value as YAML writes a scalar (``null``, ``true``), containers as compact JSON, cut at ``most``."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= most else text[: most - 3] + "..."


def changed_options(typed: dict[str, Any], stored: dict[str, Any]) -> list[Change]:
    """The options of :data:`SECTIONS` whose values differ, in the typed config's order.

    Keys only one side has are not compared (a newer tadm's new options; the other class's arguments when
    a ``class_path`` changed, which itself is compared). A list of mappings (``trainer.callbacks``) is
    compared entry by entry when both have the same length, else as one value, as are :data:`VALUE_OPTIONS`
    and a mapping against ``null``.
    """
    changes: list[Change] = []
    for section in SECTIONS:
        if section in typed and section in stored:
            changes.extend(_diff(typed[section], stored[section], section))
    return changes


def _diff(typed: Any, stored: Any, key: str) -> Iterator[Change]:
    if isinstance(typed, dict) and isinstance(stored, dict) and key not in VALUE_OPTIONS:
        for k, v in typed.items():
            if k in stored:
                yield from _diff(v, stored[k], f"{key}.{k}")
    elif (
        isinstance(typed, list)
        and isinstance(stored, list)
        and len(typed) == len(stored)
        and all(isinstance(v, dict) for v in (*typed, *stored))
    ):
        for i, (a, b) in enumerate(zip(typed, stored, strict=True)):
            yield from _diff(a, b, f"{key}[{i}]")
    elif not _same(typed, stored):
        yield Change(key, stored, typed)


def _same(a: Any, b: Any) -> bool:
    """Equal as values: ``1`` and ``1.0`` are, ``True`` and ``1`` are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def classify(key: str) -> Kind:
    """Whether a change of ``key`` may be applied on a resume, or what it would break.

    Unknown ``model.*`` arguments (a plug-in's, a newer tadm's) count as architecture: refusing is safe.
    """
    parts = key.replace("[", ".[").split(".")
    if parts[0] != "model":
        return "applied"  # trainer.* and data.*
    arg = parts[1] if len(parts) > 1 else ""
    if arg in APPLIED_MODEL_ARGS:
        return "applied"
    if arg in RESTORED_STATE_MODEL_ARGS:
        return "restored_state"
    if arg == "backbone" and len(parts) > 3 and parts[2] == "init_args" and parts[3] in BACKBONE_RUNTIME_ARGS:
        return "applied"
    return "architecture"


def split_changes(changes: list[Change], fitting: bool) -> tuple[list[Change], list[Change]]:
    """(applied, refused). Restored-state changes are refused when ``fitting`` (Lightning restores that
    state over them); evaluation restores only the weights, so they do no harm there."""
    applied: list[Change] = []
    refused: list[Change] = []
    for change in changes:
        kind = classify(change.key)
        if kind == "architecture" or (kind == "restored_state" and fitting):
            refused.append(change)
        else:
            applied.append(change)
    return applied, refused


def refusal(ckpt_path: str | Path, refused: list[Change], fitting: bool) -> str:
    """The one line that refuses a run: each option with both values, why, and what to do instead."""
    why = []
    if any(classify(c.key) == "architecture" for c in refused):
        why.append("they change what the stored weights mean")
    if any(classify(c.key) == "restored_state" for c in refused):
        why.append("the checkpoint's optimiser, LR schedule and EMA state would override them")
    verb = "resume" if fitting else "use"
    return (
        f"cannot {verb} {ckpt_path} with changed options ({'; '.join(why)}): "
        f"{', '.join(map(str, refused))}; start a new run with --model.init_from {ckpt_path} instead, "
        "or drop these options"
    )


def stored_config(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The run config a tadm checkpoint stores, parsed; None for a checkpoint without one.

    Read before Lightning reads the file (``TADMCLI.parse_arguments``): with ``weights_only=True`` (no code
    runs) and memory-mapped (the optimiser moments stay on disk). A file whose unpickling would run code, one
    that is no checkpoint, or a stored config that is not a run config's shape is a one-line
    :class:`~tadm.errors.CheckpointError` naming the file.
    """
    ckpt = load_lightning_file(ckpt_path, mmap=True)
    meta = ckpt.get(META_KEY) if isinstance(ckpt, dict) else None
    text = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return None
    return parse_run_config(text, str(ckpt_path))
