"""``tadm study plan|run STUDY.yaml``: one ``tadm fit`` + ``tadm evaluate`` per cell of a study file.

    tadm study plan configs/studies/demo.yaml    # the cells, their status and the exact commands
    tadm study run configs/studies/demo.yaml     # runs every cell without a result yet, then compares them

Each cell runs in its own processes (``python -m tadm fit ...``, then ``... evaluate``), logging to
``<output>/<cell>/fit.log`` and ``evaluate.log``: a cell that fails is reported and the others go on; the
exit status is 1 when any cell failed. Resumable: a cell whose evaluation finished (``cell.json`` says so,
with the same commands and config files) is kept; one whose training finished is only evaluated; anything
else is trained again from scratch (a half-written run is not resumed: with ``seed_everything`` the rerun
gives the run an uninterrupted one would). The end is ``tadm compare`` on the study folder. The study file
format: :mod:`tadm.studies.study_plan` and docs/studies.md.

One output folder, one study file: ``study.json`` records the resolved path of the study file that owns the
folder, and ``run`` refuses (exit 2, nothing touched) a folder that another study file owns, unless given
``--replace`` (then this study takes it over: its cells that differ are trained again). The same file, edited
or not, is the same study; a moved, renamed or copied file is another one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadm.commands.common import EXIT_FAILED, EXIT_OK, command, error_line
from tadm.ops.files import atomic_write_text
from tadm.studies.study_plan import MANIFEST, Cell, Study, load_study

#: the cell's state file: the key its results belong to and each stage's exit status and time
CELL_STATE = "cell.json"
#: lines of a failing cell's log shown in the terminal
LOG_TAIL = 12


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tadm study", description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    plan = sub.add_parser("plan", help="print the cells, their status and their commands; run nothing")
    run = sub.add_parser("run", help="train and evaluate every cell that has no result yet, then compare")
    for p in (plan, run):
        p.add_argument("study", type=Path, help="the study file (YAML; see docs/studies.md)")
        p.add_argument(
            "--cell", action="append", default=[], metavar="NAME", help="only this cell (repeatable)"
        )
    run.add_argument("--no-compare", action="store_true", help="do not run `tadm compare` at the end")
    run.add_argument(
        "--replace",
        action="store_true",
        help="take over an output folder that another study file owns (its study.json says which): this "
        "study's cells that differ from the ones there are trained again, their old results deleted",
    )
    return ap


@command("tadm study")
def study_command(argv: Sequence[str]) -> int:
    """Plan or run a study: the cells of a study file, one training and one evaluation each."""
    args = _parser().parse_args(list(argv))
    study = load_study(args.study)
    cells = _select(study.cells(), args.cell, args.study)
    if args.action == "plan":
        try:
            print(plan_text(study, cells), flush=True)
        except BrokenPipeError:  # `tadm study plan ... | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more may reach the closed pipe
        return EXIT_OK
    return run_study(study, cells, compare=not args.no_compare, replace=args.replace)


def tadm_argv() -> list[str]:
    """How a cell calls tadm: this interpreter, so a cell runs the same installation as the study."""
    return [sys.executable, "-m", "tadm"]


def plan_text(study: Study, cells: Sequence[Cell]) -> str:
    """The cells, what ``run`` would do with each, and the exact commands."""
    axes = " x ".join(f"{a} ({len(v)})" for a, v in study.axes.items())
    lines = [f"study {study.source}: {len(cells)} cell(s), axes {axes}; output {study.output}"]
    owner = foreign_owner(study)
    if owner is not None:
        lines.append(
            f"note: '{study.output}' holds the results of {owner}: `tadm study run` refuses it unless given "
            "--replace, which trains again every cell below not marked done"
        )
    lines.append("")
    for i, cell in enumerate(cells, 1):
        lines.append(f"[{i}/{len(cells)}] {cell.name}: {_status(cell)[1]}")
        lines.append("  " + _shell(["tadm", "fit", *cell.fit_args]))
        lines.append("  " + _shell(["tadm", "evaluate", "--ckpt", cell.checkpoint_hint, *cell.evaluate_args]))
    return "\n".join(lines)


@dataclass
class CellOutcome:
    name: str
    status: str  # done | kept | failed
    detail: str = ""
    seconds: float = 0.0


def run_study(study: Study, cells: Sequence[Cell], compare: bool = True, replace: bool = False) -> int:
    """Run each cell that needs it (see the module docstring); returns the exit status."""
    owner = foreign_owner(study)  # before any work: another study's results are not this one's to replace
    if owner is not None and not replace:
        raise FileExistsError(
            f"'{study.output}' holds the results of {owner}, not of study file '{study_file(study)}': run "
            "that file, give this study another `output`, or pass --replace to take the folder over (this "
            "study's cells that differ are then trained again, their old results deleted)"
        )
    for cell in cells:  # before any work: a folder the study did not make is not the study's to replace
        if _status(cell)[0] != "done":
            _check_ours(cell.directory)
    study.output.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, CellOutcome] = {}
    print(f"study {study.source}: {len(cells)} cell(s) -> {study.output}", flush=True)
    if owner is not None:
        print(
            f"--replace: '{study.output}' held the results of {owner}; this study takes it over", flush=True
        )
    previous = _terminate_as_interrupt()
    try:
        for i, cell in enumerate(cells, 1):
            state, why = _status(cell)
            if state == "done":
                outcomes[cell.name] = CellOutcome(cell.name, "kept", "finished before")
                print(f"[{i}/{len(cells)}] {cell.name}: kept (finished before)", flush=True)
                continue
            print(f"[{i}/{len(cells)}] {cell.name}: {why}", flush=True)
            _write_manifest(study, outcomes, running=cell.name)
            outcome = _run_cell(cell, fit=state != "trained")
            outcomes[cell.name] = outcome
            print(f"[{i}/{len(cells)}] {cell.name}: {outcome.status} {outcome.detail}".rstrip(), flush=True)
    finally:  # Ctrl-C included: the manifest says what finished
        _write_manifest(study, outcomes)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failed = [o for o in outcomes.values() if o.status == "failed"]
    print()
    print(_summary(outcomes.values()))
    if compare and any(o.status != "failed" for o in outcomes.values()):
        _compare(study)
    if failed:
        print(f"\n{len(failed)} of {len(cells)} cell(s) failed:", file=sys.stderr)
        for o in failed:
            print(f"- {o.name}: {o.detail}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _terminate_as_interrupt() -> Any:
    """SIGTERM (a scheduler, ``kill``) stops the study like Ctrl-C: the running cell's process is killed
    with it (``subprocess.run`` kills its child on any exception) instead of training on, orphaned.
    Returns the previous handler (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _run_cell(cell: Cell, fit: bool) -> CellOutcome:
    start = time.perf_counter()
    state: dict[str, Any] = {"key": cell.key, "name": cell.name}
    if fit:
        _clear(cell.directory)
        cell.directory.mkdir(parents=True, exist_ok=True)
        _write_state(cell, state)
        rc, seconds = _run([*tadm_argv(), "fit", *cell.fit_args], cell.directory / "fit.log")
        state["fit"] = {"returncode": rc, "seconds": round(seconds, 1)}
        _write_state(cell, state)
        if rc != 0:
            return _failed(cell, "fit", rc, start)
    else:
        state = _read_state(cell)
    checkpoint = find_checkpoint(cell.directory)
    if checkpoint is None:
        state["fit"] = {**state.get("fit", {}), "returncode": None}
        _write_state(cell, state)
        return CellOutcome(
            cell.name,
            "failed",
            f"fit wrote no last.ckpt under '{cell.directory}': the base config needs a checkpoint callback "
            "with save_last (tadm.training.callbacks.RunCheckpoint)",
            time.perf_counter() - start,
        )
    state["checkpoint"] = str(checkpoint)
    cell.summary.unlink(missing_ok=True)
    # --overwrite: a re-evaluated cell replaces its earlier (failed or partial) report
    evaluate = [*tadm_argv(), "evaluate", "--ckpt", str(checkpoint), *cell.evaluate_args, "--overwrite"]
    rc, seconds = _run(evaluate, cell.directory / "evaluate.log")
    state["evaluate"] = {"returncode": rc, "seconds": round(seconds, 1)}
    _write_state(cell, state)
    if rc != 0 or not cell.summary.is_file():
        return _failed(cell, "evaluate", rc, start)
    took = time.perf_counter() - start
    return CellOutcome(cell.name, "done", f"in {took:.0f} s", took)


def find_checkpoint(directory: Path) -> Path | None:
    """The newest ``last.ckpt`` under a cell folder (``checkpoints/`` with the usual logger)."""
    found = sorted(directory.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _run(argv: list[str], log: Path) -> tuple[int, float]:
    """Run one command with its output in ``log``; returns (exit status, seconds)."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + _shell(argv) + "\n")
        out.flush()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    return rc, time.perf_counter() - start


def _failed(cell: Cell, stage: str, rc: int, start: float) -> CellOutcome:
    log = cell.directory / f"{stage}.log"
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
    print(f"  {stage} exited {rc}; last lines of {log}:", file=sys.stderr)
    for line in tail:
        print(f"  | {line}", file=sys.stderr)
    return CellOutcome(cell.name, "failed", f"{stage} exited {rc} (log: {log})", time.perf_counter() - start)


def _status(cell: Cell) -> tuple[str, str]:
    """("done" | "trained" | "todo", why in words)."""
    state = _read_state(cell)
    if not state:
        return "todo", "to train and evaluate"
    if state.get("key") != cell.key:
        return "todo", "to train and evaluate again (its commands or config files changed)"
    fit_ok = state.get("fit", {}).get("returncode") == 0 and find_checkpoint(cell.directory) is not None
    if not fit_ok:
        return "todo", "to train again (the last training did not finish)"
    if state.get("evaluate", {}).get("returncode") == 0 and cell.summary.is_file():
        return "done", "done (kept)"
    return "trained", "trained; to evaluate"


def _read_state(cell: Cell) -> dict[str, Any]:
    path = cell.directory / CELL_STATE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _write_state(cell: Cell, state: dict[str, Any]) -> None:
    atomic_write_text(cell.directory / CELL_STATE, json.dumps(state, indent=2) + "\n")


def _check_ours(directory: Path) -> None:
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CELL_STATE).is_file():
        raise FileExistsError(
            f"'{directory}' exists and was not made by `tadm study` (no {CELL_STATE}): move it or change the "
            "study's `output`"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"'{directory}' is a file, where the study needs a folder for a cell")


def _clear(directory: Path) -> None:
    """Remove a cell's previous run (a changed or unfinished one); refuse a folder the study did not make."""
    _check_ours(directory)
    if directory.exists():
        shutil.rmtree(directory)


def study_file(study: Study) -> str:
    """What identifies a study: its file's resolved path (an edited file is the same study; a moved,
    renamed or copied one is another)."""
    return str(study.source.resolve())


def foreign_owner(study: Study) -> str | None:
    """Who owns ``study.output`` when it is not this study ("study file '...' (per out/study.json)"), or
    None: this study's, or no ``study.json`` yet. A manifest written before ``study_file`` was recorded names
    the file as it was given, resolved here against the working directory; an unreadable one counts as
    another study's."""
    path = study.output / MANIFEST
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        recorded = str(doc.get("study_file") or Path(doc["study"]).resolve())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"an unknown study ('{path}' is not readable as a study manifest: {error_line(err)})"
    return None if recorded == study_file(study) else f"study file '{recorded}' (per '{path}')"


def _write_manifest(study: Study, outcomes: dict[str, CellOutcome], running: str | None = None) -> None:
    """``study.json``: every cell, its axis values, folder and status (``tadm compare`` names rows by it)."""
    cells = []
    for cell in study.cells():
        outcome = outcomes.get(cell.name)
        status = "running" if cell.name == running else outcome.status if outcome else _status(cell)[0]
        if status == "kept":
            status = "done"
        cells.append(
            {
                "name": cell.name,
                "values": dict(cell.values),
                "directory": cell.directory.name,
                "summary": str(cell.summary.relative_to(study.output)),
                "status": status,
                "detail": outcome.detail if outcome else "",
            }
        )
    doc = {
        "study": str(study.source),
        "study_file": study_file(study),
        "axes": {a: [v.name for v in vs] for a, vs in study.axes.items()},
    }
    doc["cells"] = cells
    atomic_write_text(study.output / MANIFEST, json.dumps(doc, indent=2) + "\n")


def _summary(outcomes: Any) -> str:
    lines = ["| cell | status | detail |", "|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.detail} |" for o in outcomes]
    return "\n".join(lines)


def _compare(study: Study) -> None:
    """``tadm compare`` on the study folder, written into it; a failure here does not fail the study."""
    from tadm.commands.compare import compare_command

    print()
    compare_command([str(study.output)])


def _select(cells: list[Cell], names: Sequence[str], source: Path) -> list[Cell]:
    if not names:
        return cells
    known = {c.name: c for c in cells}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"study file '{source}' has no cell {missing[0]!r}; its cells: {sorted(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def _shell(argv: Sequence[str]) -> str:
    return shlex.join(str(a) for a in argv)
