"""Study files: one base config and a few axes, expanded to one run (a *cell*) per combination.

A study file (``configs/studies/*.yaml``, docs/studies.md)::

    base: configs/quickstart.yaml            # one config file or a list, composed in order
    set: {trainer.max_epochs: 2}             # dotted overrides for every cell, applied last (optional)
    output: runs/studies/demo                # default: runs/studies/<file name>
    axes:
      aligner: [tpm, fixed]                  # short names: configs/aligner/tpm.yaml, configs/aligner/fixed.yaml
      t:                                     # or name -> a config file, dotted overrides, null, or a list of those
        t50: {model.aligner.init_args.t: 50}
        t999: {model.aligner.init_args.t: 999}
    evaluate:
      inputs: [assets/samples/heldout]       # what `tadm evaluate` scores each cell's checkpoint on
      protocol: tadm
      args: [--no-fid]                       # any other `tadm evaluate` option

Every cell is the base, then one value of each axis in the file's order, then ``set`` (so a shortened run
stays short whatever an axis file says), so two cells that differ in one axis value differ only by that
value's settings; two axes may not set the same key (a cell would then depend on the axes' order), which
:func:`load_study` refuses. Paths are relative to the working
directory, as in ``tadm fit --config``. This module only plans (it builds the ``tadm fit`` / ``tadm evaluate``
argument lists of each cell); ``tadm study`` runs them, and :mod:`tadm.studies.run_comparison` reads the
results through the names defined here (:data:`MANIFEST`, :data:`EVAL_DIR`, :data:`SUMMARY`, :func:`flatten`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tadm.errors import ConfigError

#: axis and value names become folder names: keep them plain
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: the keys a study file may have
STUDY_KEYS = {"base", "set", "output", "axes", "evaluate"}
EVALUATE_KEYS = {"inputs", "protocol", "args"}
#: where a cell's ``tadm evaluate`` report goes, inside the cell folder
EVAL_DIR = "eval"
#: the report's file that ``tadm compare`` reads (``tadm evaluate`` writes it: :mod:`tadm.evaluation.report`)
SUMMARY = "summary.json"
#: the study's manifest in its output folder (read by ``tadm compare``)
MANIFEST = "study.json"


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: config files composed after the base, then dotted overrides."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()

    def args(self) -> list[str]:
        out: list[str] = []
        for path in self.configs:
            out += ["--config", path]
        return out + [override_arg(k, v) for k, v in self.overrides]


@dataclass(frozen=True)
class Cell:
    """One run of a study: its name (``axis=value,...``), folder and the two commands it runs."""

    name: str
    values: tuple[tuple[str, str], ...]
    directory: Path
    fit_args: tuple[str, ...]
    """``tadm fit`` arguments (without ``fit``)."""
    evaluate_args: tuple[str, ...]
    """``tadm evaluate`` arguments without ``--ckpt CKPT`` (known once ``fit`` has run)."""
    checkpoint_hint: str
    """Where ``fit`` will write ``last.ckpt``, as the plan prints it."""
    key: str
    """Hash of both argument lists and of every config file's text: a finished cell whose key changed is stale."""

    @property
    def eval_dir(self) -> Path:
        return self.directory / EVAL_DIR

    @property
    def summary(self) -> Path:
        return self.eval_dir / SUMMARY


@dataclass(frozen=True)
class Study:
    """A parsed study file (see the module docstring)."""

    source: Path
    base: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]
    axes: dict[str, tuple[AxisValue, ...]]
    output: Path
    inputs: tuple[str, ...]
    protocol: str = "tadm"
    evaluate_options: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    """Every config file the study composes -> SHA-256 of its text (part of each cell's key)."""

    def cells(self) -> list[Cell]:
        """Every combination of axis values, the first axis varying slowest."""
        names = list(self.axes)
        return [self._cell(dict(zip(names, combo, strict=True))) for combo in _product(self.axes)]

    def _cell(self, choice: dict[str, AxisValue]) -> Cell:
        name = ",".join(f"{axis}={value.name}" for axis, value in choice.items())
        directory = self.output / name
        args: list[str] = []
        for path in self.base:
            args += ["--config", path]
        for value in choice.values():
            args += value.args()
        args += [override_arg(k, v) for k, v in self.overrides]
        settings = self.settings(choice.values())
        if _sets_logger(settings):  # the base's logger: send its logs and checkpoints to the cell
            args += [
                f"--trainer.logger.init_args.save_dir={self.output}",
                f"--trainer.logger.init_args.name={name}",
            ]
            hint = str(directory / "checkpoints" / "last.ckpt")
        else:
            hint = str(directory / "**" / "last.ckpt")
        args.append(f"--trainer.default_root_dir={directory}")
        evaluate = [*self.inputs, "--output", str(directory / EVAL_DIR), "--protocol", self.protocol]
        evaluate += ["--no-progress", *self.evaluate_options]
        key = hashlib.sha256(
            json.dumps({"fit": args, "evaluate": evaluate, "files": self.files}, sort_keys=True).encode()
        ).hexdigest()[:16]
        values = tuple((axis, value.name) for axis, value in choice.items())
        return Cell(name, values, directory, tuple(args), tuple(evaluate), hint, key)

    def settings(self, values: Iterator[AxisValue] | Any = ()) -> dict[str, Any]:
        """The dotted keys the base, ``set`` and the given axis values write, as their YAML says (not
        resolved by the parser: defaults and links are not in it)."""
        out: dict[str, Any] = {}
        for path in self.base:
            _merge(out, flatten(_read_yaml(Path(path), self.source)))
        for value in values:
            for path in value.configs:
                _merge(out, flatten(_read_yaml(Path(path), self.source)))
            _merge(out, dict(value.overrides))
        _merge(out, dict(self.overrides))
        return out


def load_study(path: str | os.PathLike[str]) -> Study:
    """Parse and check a study file; every problem is a :class:`ConfigError` naming the file."""
    source = Path(path)
    try:
        doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study file '{source}' not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"study file '{source}': not readable YAML ({err})") from err

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"study file '{source}': {problem}")

    if not isinstance(doc, dict):
        raise fail("expected a mapping with `base` and `axes`")
    unknown = set(doc) - STUDY_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}; a study has {sorted(STUDY_KEYS)}")
    base = doc.get("base")
    base_files = [base] if isinstance(base, str) else base
    if not base_files or not isinstance(base_files, list) or not all(isinstance(b, str) for b in base_files):
        raise fail("`base` must name a config file or a list of them")
    for b in base_files:
        _check_file(b, "base", fail)
    overrides = _overrides(doc.get("set") or {}, "set", fail)
    axes_doc = doc.get("axes")
    if not isinstance(axes_doc, dict) or not axes_doc:
        raise fail("`axes` must map each axis name to its values")
    axes: dict[str, tuple[AxisValue, ...]] = {}
    for axis, values in axes_doc.items():
        if not isinstance(axis, str) or not NAME.match(axis):
            raise fail(f"axis name {axis!r}: use letters, digits and . _ + - only")
        axes[axis] = _axis_values(axis, values, fail)
    evaluate = doc.get("evaluate")
    if not isinstance(evaluate, dict) or not evaluate.get("inputs"):
        raise fail("`evaluate` must give `inputs` (images or folders for `tadm evaluate`)")
    unknown = set(evaluate) - EVALUATE_KEYS
    if unknown:
        raise fail(f"`evaluate` has unknown key(s) {sorted(unknown)}; it takes {sorted(EVALUATE_KEYS)}")
    inputs = [evaluate["inputs"]] if isinstance(evaluate["inputs"], str) else evaluate["inputs"]
    options = evaluate.get("args") or []
    if not isinstance(inputs, list) or not isinstance(options, list):
        raise fail("`evaluate.inputs` and `evaluate.args` must be lists")
    for flag in ("--ckpt", "--output", "-o", "--protocol"):
        if any(str(o) == flag or str(o).startswith(flag + "=") for o in options):
            raise fail(f"`evaluate.args` may not set {flag}: the study sets it for each cell")
    output = Path(doc.get("output") or Path("runs") / "studies" / source.stem)
    files = [*base_files, *(c for values in axes.values() for v in values for c in v.configs)]
    study = Study(
        source=source,
        base=tuple(base_files),
        overrides=overrides,
        axes=axes,
        output=output,
        inputs=tuple(str(i) for i in inputs),
        protocol=str(evaluate.get("protocol", "tadm")),
        evaluate_options=tuple(str(o) for o in options),
        files={f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in dict.fromkeys(files)},
    )
    _check_disjoint_axes(study, fail)
    return study


def override_arg(key: str, value: Any) -> str:
    """``--key=value`` as jsonargparse reads it (YAML flow syntax for anything but a plain string)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}`` (lists and scalars are leaves)."""
    if not isinstance(doc, Mapping) or (prefix and not doc):
        return {prefix: doc} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _product(axes: dict[str, tuple[AxisValue, ...]]) -> Iterator[tuple[AxisValue, ...]]:
    return itertools.product(*axes.values())


def _axis_values(axis: str, values: Any, fail: Any) -> tuple[AxisValue, ...]:
    """A list of config files / short names, or a mapping name -> file, overrides, null or a list of those."""
    out: list[AxisValue] = []
    if isinstance(values, list):
        for item in values:
            if not isinstance(item, str):
                raise fail(f"axis `{axis}`: a list holds config files or short names; name other values")
            path = _resolve_short(axis, item, fail)
            out.append(AxisValue(Path(path).stem, (path,)))
    elif isinstance(values, dict):
        for name, spec in values.items():
            where = f"axis `{axis}`, value `{name}`"
            if not isinstance(name, str) or not NAME.match(name):
                raise fail(f"axis `{axis}`: value name {name!r}: use letters, digits and . _ + - only")
            parts = spec if isinstance(spec, list) else [spec]
            configs: list[str] = []
            overrides: list[tuple[str, Any]] = []
            for part in parts:
                if part is None:
                    continue
                if isinstance(part, str):
                    configs.append(_resolve_short(axis, part, fail))
                elif isinstance(part, dict):
                    overrides += _overrides(part, where, fail)
                else:
                    raise fail(f"{where}: expected a config file, dotted overrides or null, got {part!r}")
            out.append(AxisValue(name, tuple(configs), tuple(overrides)))
    else:
        raise fail(f"axis `{axis}`: expected a list or a mapping of values, got {values!r}")
    if not out:
        raise fail(f"axis `{axis}` has no values")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise fail(f"axis `{axis}`: value names repeat ({names})")
    for v in out:
        if not NAME.match(v.name):
            raise fail(f"axis `{axis}`: value name {v.name!r}: use letters, digits and . _ + - only")
    return tuple(out)


def _resolve_short(axis: str, item: str, fail: Any) -> str:
    """``tpm`` on axis ``aligner`` -> ``configs/aligner/tpm.yaml``; anything with a ``/`` or ``.yaml`` is a path."""
    if "/" in item or item.endswith((".yaml", ".yml")):
        return _check_file(item, f"axis `{axis}`", fail)
    path = f"configs/{axis}/{item}.yaml"
    if not Path(path).is_file():
        raise fail(f"axis `{axis}`: short name `{item}` means '{path}', which does not exist here")
    return path


def _check_file(path: str, where: str, fail: Any) -> str:
    if not Path(path).is_file():
        raise fail(f"{where}: config file '{path}' not found (paths are relative to the working directory)")
    return path


def _overrides(doc: Any, where: str, fail: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(doc, dict):
        raise fail(f"`{where}` must map dotted keys to values, got {doc!r}")
    for key in doc:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise fail(f"`{where}`: {key!r} is not a dotted key such as model.aligner.init_args.t")
    return tuple(doc.items())


def _read_yaml(path: Path, source: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"study file '{source}': cannot read config '{path}' ({err})") from err


def _merge(out: dict[str, Any], new: dict[str, Any]) -> None:
    """Later settings win; a key replaces everything under it."""
    for key, value in new.items():
        for old in [k for k in out if k.startswith(key + ".")]:
            del out[old]
        out[key] = value


def _sets_logger(settings: dict[str, Any]) -> bool:
    """Whether the composition names a logger class (whose ``save_dir`` / ``name`` the study then sets)."""
    if isinstance(settings.get("trainer.logger"), str):
        return True
    return "trainer.logger.class_path" in settings


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_disjoint_axes(study: Study, fail: Any) -> None:
    """Two axes setting the same key would make a cell depend on the order of the axes: refuse."""
    touched = {
        axis: {k for v in values for k, _ in v.overrides}
        | {k for v in values for c in v.configs for k in flatten(_read_yaml(Path(c), study.source))}
        for axis, values in study.axes.items()
    }
    axes = list(touched)
    for i, a in enumerate(axes):
        for b in axes[i + 1 :]:
            clash = sorted(k for k in touched[a] for j in touched[b] if _overlaps(k, j))
            if clash:
                raise fail(
                    f"axes `{a}` and `{b}` both set {clash[0]}: a cell would depend on the order of the axes "
                    "(merge them into one axis, or let each set its own keys)"
                )
