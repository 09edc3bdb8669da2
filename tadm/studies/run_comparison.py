"""``tadm compare``: the reports of several ``tadm evaluate`` runs as one table and two plots.

Reads each run's ``summary.json`` (a run folder holding it or ``eval/summary.json``, the file itself, or a
``tadm study`` output folder, whose ``study.json`` lists its cells). One row per run, named by what differs
between the runs: the study's cell names, else the config keys that differ between the runs' configs
(``config.yaml`` beside each checkpoint), else the folder names. A bicubic reference row per scale is kept
from the first run that has one. Runs scored under different protocols or on different images (the
image-set fingerprint of ``summary.json``) are refused, or, when the caller allows it, flagged in a column
and a note: never silently mixed. A metric a run did not compute stays blank.

Outputs: ``compare.md`` (the Markdown table and its notes), ``compare.csv`` and, with matplotlib installed
(``pip install 'tadm[study]'``), ``perception_distortion.png`` (PSNR-Y against LPIPS and DISTS, one
labelled point per run) and ``quality_time.png`` (PSNR-Y against seconds per image).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tadm.errors import InputError
from tadm.ops.files import atomic_write, atomic_write_text
from tadm.studies.study_plan import EVAL_DIR, MANIFEST, SUMMARY, flatten

#: config keys that differ between any two runs without being what the runs compare
IGNORED_KEYS = ("trainer.logger", "trainer.default_root_dir", "ckpt_path", "trainer.enable_progress_bar")
#: the table: (header, Row attribute, digits; None for text / integers)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("run", "name", None),
    ("images", "images", None),
    ("PSNR-Y", "psnr_y", 2),
    ("SSIM-Y", "ssim_y", 4),
    ("LPIPS", "lpips", 4),
    ("DISTS", "dists", 4),
    ("FID", "fid", 2),
    ("KID", "kid", 4),
    ("LR bpp", "lr_bpp", 4),
    ("s/image", "seconds", 3),
    ("trainable params", "trainable_parameters", None),
    ("protocol", "protocol", None),
)
OUTPUT_FILES = ("compare.md", "compare.csv", "perception_distortion.png", "quality_time.png")


class MixedRunsError(InputError):
    """Runs evaluated under different protocols or on different images: their numbers do not compare."""


@dataclass
class Row:
    """One method of one run's ``summary.json`` (None: not computed, shown blank)."""

    name: str
    source: str
    method: str
    images: int | None = None
    psnr_y: float | None = None
    ssim_y: float | None = None
    lpips: float | None = None
    dists: float | None = None
    fid: float | None = None
    kid: float | None = None
    lr_bpp: float | None = None
    seconds: float | None = None
    trainable_parameters: int | None = None
    protocol: str = ""
    image_set: str | None = None
    color_fix: str = "none"
    scale: int | None = None
    reference: bool = False
    flag: str = ""


@dataclass
class Comparison:
    """The rows (runs first, then bicubic references) and the notes under the table."""

    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    mixed: bool = False

    def markdown(self) -> str:
        columns = [*COLUMNS, ("flag", "flag", None)] if self.mixed else list(COLUMNS)
        lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
        for row in self.rows:
            cells = [_cell(getattr(row, attr), digits, attr) for _, attr, digits in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join([*lines, "", *self.notes]).rstrip() + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        names = [f.name for f in fields(Row)]
        writer.writerow(names)
        for row in self.rows:
            writer.writerow(["" if (v := getattr(row, n)) is None else v for n in names])
        return buf.getvalue()


def compare_runs(paths: Sequence[str | os.PathLike[str]], allow_mixed: bool = False) -> Comparison:
    """Load the runs ``paths`` name and check they compare (see the module docstring)."""
    if not paths:
        raise InputError("no runs to compare")
    runs: list[tuple[str | None, Path]] = []  # (name from a study or None, summary.json)
    notes: list[str] = []
    for path in paths:
        runs += _expand(Path(path), notes)
    if not runs:
        raise InputError(f"no evaluated runs in {[str(p) for p in paths]}: run `tadm evaluate` first")
    seen: dict[Path, None] = {}
    runs = [r for r in runs if not (r[1].resolve() in seen or seen.setdefault(r[1].resolve(), None))]
    docs = [_read_summary(summary) for _, summary in runs]
    names = _row_names([name for name, _ in runs], [s for _, s in runs], docs)
    rows: list[Row] = []
    references: dict[tuple[Any, ...], Row] = {}
    for name, (_, summary), doc in zip(names, runs, docs, strict=True):
        methods = [m for m in doc.get("methods", []) if not str(m.get("method", "")).startswith("bicubic")]
        for m in methods:
            label = name if len(methods) == 1 else f"{name} / {m.get('method')}"
            rows.append(_row(label, summary, doc, m))
        for m in doc.get("methods", []):
            if str(m.get("method", "")).startswith("bicubic"):
                ref = _row(f"{m['method']} (reference)", summary, doc, m, reference=True)
                ref.trainable_parameters = 0
                references.setdefault((ref.method, ref.protocol, ref.image_set), ref)
    if not rows:
        raise InputError("the runs hold only bicubic rows: nothing to compare")
    refs = list(references.values())
    for ref in refs:  # one reference per protocol and image set (mixed runs): say which
        if sum(r.method == ref.method for r in refs) > 1:
            ref.name = f"{ref.method} (reference: {ref.protocol}, images {(ref.image_set or 'unknown')[:8]})"
    missing = [n for doc in docs for n in doc.get("notes", []) if " not computed" in str(n)]
    notes += [f"In the runs' reports: {n}" for n in dict.fromkeys(missing)]  # why a column is blank
    comparison = Comparison(rows + refs, notes)
    _check_mixed(comparison, allow_mixed)
    comparison.notes[:0] = _header_notes(comparison)
    return comparison


def write_comparison(comparison: Comparison, output: str | os.PathLike[str]) -> list[Path]:
    """Write the table (Markdown, CSV) and, when matplotlib is installed, the plots; returns the files."""
    out = Path(output)
    written = [
        atomic_write_text(out / "compare.md", comparison.markdown()),
        atomic_write_text(out / "compare.csv", comparison.csv()),
    ]
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        comparison.notes.append(
            "Plots not drawn: they need matplotlib (`pip install 'tadm[study]'` or `pip install matplotlib`)."
        )
        written[0] = atomic_write_text(out / "compare.md", comparison.markdown())
        return written
    written.append(_plot_perception_distortion(comparison.rows, out / "perception_distortion.png"))
    written.append(_plot_quality_time(comparison.rows, out / "quality_time.png"))
    return written


# ------------------------------------------------------------------------------------------ reading runs


def _expand(path: Path, notes: list[str]) -> list[tuple[str | None, Path]]:
    """A study folder -> its evaluated cells (notes for the others); a run folder or file -> its summary."""
    if (path / MANIFEST).is_file():
        return _study_cells(path, notes)
    for candidate in (path, path / SUMMARY, path / EVAL_DIR / SUMMARY):
        if candidate.is_file() and candidate.name == SUMMARY:
            return [(None, candidate)]
    if not path.exists():
        raise InputError(f"'{path}' does not exist")
    raise InputError(
        f"'{path}' holds no {SUMMARY} (nor {EVAL_DIR}/{SUMMARY}, nor a study's {MANIFEST}): "
        "pass a `tadm evaluate --output` folder or a `tadm study` output folder"
    )


def _study_cells(folder: Path, notes: list[str]) -> list[tuple[str | None, Path]]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        cells = list(manifest["cells"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"'{folder / MANIFEST}' is not a study manifest ({err})") from err
    out: list[tuple[str | None, Path]] = []
    for cell in cells:
        summary = folder / cell["summary"]
        if summary.is_file() and cell.get("status") == "done":
            out.append((str(cell["name"]), summary))
        else:
            why = cell.get("detail") or cell.get("status", "not run")
            notes.append(
                f"Not in the table: cell `{cell['name']}` of {folder} ({cell.get('status')}: {why})."
            )
    return out


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"'{path}' is not a readable {SUMMARY} ({err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("methods"), list):
        raise InputError(f"'{path}' is not a `tadm evaluate` {SUMMARY} (no `methods` list)")
    return doc


def _row(name: str, summary: Path, doc: dict[str, Any], m: dict[str, Any], reference: bool = False) -> Row:
    protocol = doc.get("protocol") or {}
    image_set = doc.get("image_set") or {}
    model = doc.get("model") or {}
    crop = protocol.get("crop_border")
    return Row(
        name=name,
        source=str(summary),
        method=str(m.get("method", "")),
        images=m.get("images"),
        psnr_y=_number(m.get("psnr_y")),
        ssim_y=_number(m.get("ssim_y")),
        lpips=_number(m.get("lpips")),
        dists=_number(m.get("dists")),
        fid=_number(m.get("fid")),
        kid=_number(m.get("kid")),
        lr_bpp=_number(m.get("lr_bpp")),
        seconds=_number(m.get("seconds")),
        trainable_parameters=model.get("trainable_parameters"),
        protocol=f"{protocol.get('name', '?')}" + (f" (crop {crop})" if crop else ""),
        image_set=image_set.get("fingerprint"),
        color_fix=str(doc.get("color_fix", "none")),
        scale=model.get("scale"),
        reference=reference,
    )


def _number(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)  # "inf" / "nan" strings included


# ------------------------------------------------------------------------------------------ row names


def _row_names(study_names: list[str | None], summaries: list[Path], docs: list[dict[str, Any]]) -> list[str]:
    """The study's cell names; else what differs between the runs' configs; else folder names."""
    folders = [_run_folder(s) for s in summaries]
    if all(n is not None for n in study_names) and len(set(study_names)) == len(study_names):
        return [str(n) for n in study_names]
    configs = [_run_config(doc, s) for doc, s in zip(docs, summaries, strict=True)]
    names: list[str] = []
    if len(configs) > 1 and all(c is not None for c in configs):
        names = _differences([c for c in configs if c is not None])
    if not names or len(set(names)) != len(names) or not all(names):
        names = [n or f for n, f in zip(study_names, folders, strict=True)]
    if len(set(names)) != len(names):
        names = [str(s.parent) for s in summaries]
    return names


def _run_folder(summary: Path) -> str:
    folder = summary.parent
    return folder.parent.name if folder.name == EVAL_DIR else folder.name


def _run_config(doc: dict[str, Any], summary: Path) -> dict[str, Any] | None:
    """The run's config: ``config.yaml`` beside the evaluated checkpoint (``tadm fit`` writes it there)."""
    checkpoint = (doc.get("model") or {}).get("checkpoint")
    if not checkpoint:
        return None
    path = Path(checkpoint)
    candidates = [path.parent / "config.yaml"]
    if not path.is_absolute():
        candidates.append(summary.parent / path.parent / "config.yaml")
    for candidate in candidates:
        if candidate.is_file():
            try:
                loaded = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return None
            return flatten(loaded) if isinstance(loaded, dict) else None
    return None


def _differences(configs: list[dict[str, Any]]) -> list[str]:
    """``key=value, ...`` of the keys whose values differ between the configs (a swapped class stands for
    its arguments), keys shortened to their last parts that are still unique."""
    keys = sorted({k for c in configs for k in c})
    differ = [
        k
        for k in keys
        if not k.startswith(IGNORED_KEYS) and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    ]
    swapped = {k[: -len(".class_path")] for k in differ if k.endswith(".class_path")}
    differ = [k for k in differ if not any(k.startswith(s + ".init_args.") for s in swapped)]
    short = _short_keys(differ)
    names = []
    for config in configs:
        parts = []
        for key in differ:
            value = config.get(key)
            if key.endswith(".class_path") and isinstance(value, str):
                value = value.rsplit(".", 1)[-1]
            parts.append(f"{short[key]}={_value_text(value)}")
        names.append(", ".join(parts))
    return names


def _short_keys(keys: list[str]) -> dict[str, str]:
    def parts(key: str) -> list[str]:
        p = [x for x in key.split(".") if x not in ("init_args", "class_path")]
        return p or [key]

    out = {}
    for key in keys:
        p = parts(key)
        for n in range(1, len(p) + 1):
            candidate = ".".join(p[-n:])
            if sum(1 for other in keys if ".".join(parts(other)[-n:]) == candidate) == 1:
                out[key] = candidate
                break
        else:
            out[key] = key
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


# ------------------------------------------------------------------------------------------ mixing


def _check_mixed(comparison: Comparison, allow_mixed: bool) -> None:
    """Different protocols or image sets: an error, or with ``allow_mixed`` a flag per row and a note."""
    runs = comparison.rows
    problems = []
    for what, attr in (("protocols", "protocol"), ("image sets", "image_set")):
        groups: dict[Any, list[Row]] = {}
        for row in runs:
            groups.setdefault(getattr(row, attr), []).append(row)
        if len(groups) > 1 or None in groups:
            problems.append((what, attr, groups))
    if not problems:
        return
    lines = []
    for what, attr, groups in problems:
        for value, members in groups.items():
            label = "unknown (a summary.json older than image-set fingerprints)" if value is None else value
            label = label[:12] if attr == "image_set" and value is not None else label
            lines.append(f"{what[:-1]} {label}: {', '.join(sorted({r.name for r in members}))}")
    if not allow_mixed:
        raise MixedRunsError(
            "these runs do not compare: "
            + "; ".join(lines)
            + ". Evaluate every run with the same `--protocol` on the same images (an older summary.json: "
            "rerun `tadm evaluate`), or pass --allow-mixed to see them flagged."
        )
    comparison.mixed = True
    first = runs[0]
    for row in runs:
        flags = [
            f"other {what[:-1]}"
            for what, attr, _ in problems
            if getattr(row, attr) != getattr(first, attr) or getattr(row, attr) is None
        ]
        row.flag = ", ".join(flags)
    comparison.notes.append(
        "**Mixed runs (--allow-mixed)**: rows with a flag differ from the first row in "
        + " and ".join(w for w, _, _ in problems)
        + "; their numbers do not compare with the others. "
        + "; ".join(lines)
        + "."
    )


def _header_notes(comparison: Comparison) -> list[str]:
    rows = comparison.rows
    protocols = sorted({r.protocol for r in rows})
    sets = sorted({(r.image_set or "unknown")[:12] for r in rows})
    fixes = sorted({r.color_fix for r in rows})
    counts = sorted({r.images for r in rows if r.images is not None})
    notes = [
        f"Protocol {', '.join(f'`{p}`' for p in protocols)}; image set {', '.join(sets)} "
        f"({'/'.join(str(c) for c in counts)} images per run); colour correction {', '.join(fixes)}.",
        "Means over images (`tadm evaluate`); blank: not computed in that run. LR bpp: bits of the 8-bit LR "
        "image as a PNG per HR pixel; s/image: the round trip's wall clock on the machine that evaluated; "
        "trainable params: what the checkpoint's stage trains.",
    ]
    if len(counts) > 1:
        notes.append(
            "Runs scored different numbers of images (a method failed on some): see each summary.md."
        )
    return notes


def _cell(value: Any, digits: int | None, attr: str) -> str:
    if value is None:
        return ""
    if attr == "trainable_parameters":
        return _count(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits if digits is not None else 4}f}"
    return str(value)


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


# ------------------------------------------------------------------------------------------ plots


def _figure(panels: int):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure  # the Agg canvas: no display, no pyplot state

    fig = Figure(figsize=(4.6 * panels + 2.6, 4.2), layout="constrained")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _scatter(ax, rows: Sequence[Row], x: str, y: str) -> int:  # type: ignore[no-untyped-def]
    """One point per row that has both values, marked with the row's number (the legend names it);
    returns how many. A colour and a number per row stay the same in every panel and plot."""
    n = 0
    for i, row in enumerate(rows, 1):
        xv, yv = getattr(row, x), getattr(row, y)
        if xv is None or yv is None or not (math.isfinite(xv) and math.isfinite(yv)):
            continue
        marker = "x" if row.reference else "o"
        ax.scatter([xv], [yv], marker=marker, color=f"C{(i - 1) % 10}", label=f"{i}: {row.name}")
        ax.annotate(str(i), (xv, yv), xytext=(4, 3), textcoords="offset points", fontsize=8)
        n += 1
    if n:
        ax.margins(0.15)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return n


def _legend(fig, axes) -> None:  # type: ignore[no-untyped-def]
    """One legend for the figure: the union of the panels' labelled points, in row order."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        labels = sorted(seen, key=lambda s: int(s.split(":", 1)[0]))
        fig.legend([seen[k] for k in labels], labels, loc="outside right upper", fontsize=7, frameon=False)


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _plot_perception_distortion(rows: list[Row], path: Path) -> Path:
    fig, axes = _figure(2)
    for ax, metric, label in zip(axes, ("lpips", "dists"), ("LPIPS", "DISTS"), strict=True):
        ax.set_xlabel(f"{label} (lower is better)")
        ax.set_ylabel("PSNR-Y, dB (higher is better)")
        ax.set_title(f"perception-distortion: PSNR-Y vs {label}", fontsize=9)
        if not _scatter(ax, rows, metric, "psnr_y"):
            ax.text(0.5, 0.5, f"{label} not computed in these runs\n(tadm evaluate needs the VGG16 weights)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
    _legend(fig, axes)
    return _save(fig, path)


def _plot_quality_time(rows: list[Row], path: Path) -> Path:
    fig, (ax,) = _figure(1)
    ax.set_xlabel("seconds per image (round trip)")
    ax.set_ylabel("PSNR-Y, dB (higher is better)")
    ax.set_title("quality vs time", fontsize=9)
    if _scatter(ax, rows, "seconds", "psnr_y"):
        ax.set_xscale("log")
    _legend(fig, [ax])
    return _save(fig, path)
