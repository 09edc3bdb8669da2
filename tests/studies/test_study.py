"""Study files and ``tadm study``: every shipped study's cells parse and build (on tiny twins), neighbouring
cells differ only by the swapped component, a failing cell is reported while the others finish, and a rerun
does only what is missing."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import tadm.commands.study as study_cmd
from tadm.commands.main import main
from tadm.errors import ConfigError
from tadm.studies.study_plan import AxisValue, Cell, Study, flatten, load_study
from tests.helpers import CONFIGS, REPO, SAMPLES

STUDIES = sorted(p.relative_to(REPO).as_posix() for p in (CONFIGS / "studies").glob("*.yaml"))
#: what differs between any two cells besides their axis values: where each cell writes, which files it read
PER_CELL_KEYS = ("trainer.logger.init_args.name", "trainer.default_root_dir", "config")


def _shrink(study: Study, cell: Cell) -> list[str]:
    """A full-size cell on its backbone family's tiny twin, without the previous stage's checkpoint, on
    the bundled photos, with a pixel loss alone; the quickstart's cells (no preset) run as they are, less a
    previous phase's checkpoint (configs/shipped's phase 2 starts from runs/, absent from a checkout)."""
    settings = study.settings(v for axis, name in cell.values for v in study.axes[axis] if v.name == name)
    preset = settings.get("model.backbone.init_args.preset")
    if preset is None:
        return ["--model.init_from=null"]
    from tadm.components.backbones.diffusers_base.variants import KNOWN_VARIANTS
    from tadm.testing.twins import twin_args

    return [
        *twin_args(f"tiny-{KNOWN_VARIANTS[preset].family}"),
        "--model.backbone.init_args.vae=null",
        "--model.backbone.init_args.gradient_checkpointing=false",
        "--model.init_from=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--data.init_args.train_dir={SAMPLES / 'train'}",
        f"--data.init_args.val_dir={SAMPLES / 'val'}",
        "--data.init_args.crop_size=64",
        "--data.init_args.num_workers=0",
        '--model.loss_weights={"pixel": 2.0}',  # the same VGG in every cell, 7 s each to build: left out
    ]


def _keys(value: AxisValue) -> set[str]:
    """The dotted keys an axis value sets (its config files' and its overrides)."""
    keys = {k for k, _ in value.overrides}
    for path in value.configs:
        keys |= set(flatten(yaml.safe_load(Path(path).read_text()) or {}))
    return keys


def _root(key: str) -> str:
    """The component a key belongs to: ``model.aligner.init_args.t`` -> ``model.aligner``."""
    if ".init_args." in key:
        return key.split(".init_args.")[0]
    return key.removesuffix(".class_path")


@pytest.mark.parametrize("path", STUDIES)
def test_study_cells_build_and_neighbours_differ_only_by_the_swapped_component(
    path: str, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Each cell's config parses and builds (``tadm fit``'s objects, not run); two cells one axis value
    apart resolve to configs whose differing keys all belong to that axis's components."""
    from tests.helpers.cli import build_cli

    monkeypatch.chdir(REPO)  # study paths are relative to the working directory
    study = load_study(path)
    cells = study.cells()
    sizes = [len(v) for v in study.axes.values()]
    assert len(cells) == len({c.name for c in cells}) == math.prod(sizes) >= 2
    resolved: dict[str, dict[str, Any]] = {}
    for cell in cells:
        shrink = _shrink(study, cell)
        cli = build_cli([*cell.fit_args, *shrink])
        assert cli.model is not None and cli.datamodule is not None
        config = flatten(cli.config.as_dict())
        shrunk = {a[2:].split("=")[0] for a in shrink}
        for axis, name in cell.values:  # the cell's overrides reached the parsed config
            value = next(v for v in study.axes[axis] if v.name == name)
            for key, expected in value.overrides:
                if key in shrunk:
                    continue
                # a mapping value (model.loss_weights: {...}) reaches the parsed config as its dotted leaves
                leaves = flatten(expected, key) if isinstance(expected, dict) else {key: expected}
                assert {k: config.get(k) for k in leaves} == leaves, (cell.name, key)
        assert config["trainer.default_root_dir"] == str(cell.directory)
        resolved[cell.name] = config
    for a, b in itertools.combinations(cells, 2):
        swapped = [axis for (axis, va), (_, vb) in zip(a.values, b.values, strict=True) if va != vb]
        if len(swapped) != 1:
            continue
        roots = {_root(k) for v in study.axes[swapped[0]] for k in _keys(v)}
        ca, cb = resolved[a.name], resolved[b.name]
        differ = {k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k)} - set(PER_CELL_KEYS)
        assert differ, f"{a.name} and {b.name} resolve to the same config"
        stray = sorted(k for k in differ if not any(k == r or k.startswith(r + ".") for r in roots))
        assert not stray, (
            f"{a.name} vs {b.name}: keys outside axis `{swapped[0]}` ({sorted(roots)}) differ: {stray}"
        )


# --------------------------------------------------------------------------------------------- study files


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with a base config, an aligner config and an images folder."""
    monkeypatch.chdir(tmp_path)
    _write(
        tmp_path / "base.yaml",
        "trainer:\n  logger:\n    class_path: TensorBoardLogger\nmodel:\n  scale: 16\n",
    )
    (tmp_path / "configs" / "aligner").mkdir(parents=True)
    _write(tmp_path / "configs" / "aligner" / "tpm.yaml", "model:\n  aligner:\n    class_path: tpm\n")
    (tmp_path / "images").mkdir()
    return tmp_path


BAD_STUDIES = {
    "unknown key": ("base: base.yaml\naxes: {x: {a: null}}\nevaluate: {inputs: [images]}\nextra: 1\n", "unknown key"),
    "no base": ("axes: {x: {a: null}}\nevaluate: {inputs: [images]}\n", "`base`"),
    "missing base": ("base: nope.yaml\naxes: {x: {a: null}}\nevaluate: {inputs: [images]}\n", "'nope.yaml' not found"),
    "short name": ("base: base.yaml\naxes: {aligner: [fixed]}\nevaluate: {inputs: [images]}\n",
                   "'configs/aligner/fixed.yaml', which does not exist"),
    "no inputs": ("base: base.yaml\naxes: {x: {a: null}}\n", "`evaluate` must give `inputs`"),
    "bad name": ("base: base.yaml\naxes: {x: {'a b': null}}\nevaluate: {inputs: [images]}\n", "value name"),
    "sets output": ("base: base.yaml\naxes: {x: {a: null}}\nevaluate: {inputs: [images], args: [--output, o]}\n",
                    "may not set --output"),
    "clashing axes": (
        "base: base.yaml\naxes:\n  aligner: [tpm]\n  t: {t1: {model.aligner: {class_path: fixed}}}\n"
        "evaluate: {inputs: [images]}\n",
        "axes `aligner` and `t` both set model.aligner",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_STUDIES)
def test_bad_study_files_name_the_file_and_the_problem(
    case: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, message = BAD_STUDIES[case]
    path = _write(workdir / "bad.yaml", text)
    with pytest.raises(ConfigError, match="study file '.*bad.yaml'") as err:
        load_study(path)
    assert message in str(err.value)
    assert main(["study", "plan", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_axis_values_compose_in_order_with_set_last(workdir: Path) -> None:
    path = _write(
        workdir / "s.yaml",
        """
        base: base.yaml
        set: {trainer.max_steps: 5}
        axes:
          aligner: [tpm, configs/aligner/tpm.yaml]
          t: {lo: [null, {model.t: 1}], hi: {model.t: 999, model.note: "a b"}}
        evaluate: {inputs: images, protocol: pyiqa, args: [--no-fid]}
        """,
    )
    with pytest.raises(ConfigError, match="value names repeat"):  # both list items are named tpm
        load_study(path)
    path.write_text(path.read_text().replace("[tpm, configs/aligner/tpm.yaml]", "{tpm: tpm, none: null}"))
    study = load_study(path)
    cells = study.cells()
    assert [c.name for c in cells] == [
        "aligner=tpm,t=lo",
        "aligner=tpm,t=hi",
        "aligner=none,t=lo",
        "aligner=none,t=hi",
    ]
    first = list(cells[0].fit_args)
    assert first[:6] == [
        "--config",
        "base.yaml",
        "--config",
        "configs/aligner/tpm.yaml",
        "--model.t=1",
        "--trainer.max_steps=5",
    ]
    assert "--model.note=a b" in cells[1].fit_args and "--model.t=999" in cells[1].fit_args
    assert "--trainer.logger.init_args.name=aligner=tpm,t=lo" in first  # the base names a logger
    assert cells[0].checkpoint_hint == str(study.output / "aligner=tpm,t=lo" / "checkpoints" / "last.ckpt")
    assert study.output == Path("runs/studies/s")
    assert list(cells[0].evaluate_args) == [
        "images", "--output", str(cells[0].eval_dir), "--protocol", "pyiqa", "--no-progress", "--no-fid"
    ]  # fmt: skip
    assert len({c.key for c in cells}) == 4


# --------------------------------------------------------------------------------------------- running


FAKE_TADM = '''
"""Stands in for `python -m tadm` in the runner tests: records each call, writes what fit / evaluate write."""
import json, sys
from pathlib import Path

here = Path(__file__).parent
argv = sys.argv[1:]
opt = lambda p: next(a.split("=", 1)[1] for a in argv if a.startswith(p))
if argv[0] == "fit":
    name = opt("--trainer.logger.init_args.name=")
    with open(here / "calls.txt", "a") as f:
        f.write(f"fit {name}\\n")
    if (here / "hang").exists():  # stand for a long training: say who we are, then wait
        import os, time
        (here / "child.pid").write_text(str(os.getpid()))
        time.sleep(60)
    if "--fake.fail=true" in argv and (here / "fail").exists():
        print("Traceback: the model diverged")
        sys.exit(1)
    ckpt = Path(opt("--trainer.logger.init_args.save_dir=")) / name / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(name)
else:
    assert argv[0] == "evaluate", argv
    ckpt = Path(argv[argv.index("--ckpt") + 1])
    with open(here / "calls.txt", "a") as f:
        f.write(f"evaluate {ckpt.read_text()}\\n")
    if (here / "fail_eval").exists():
        sys.exit(2)
    out = Path(argv[argv.index("--output") + 1])
    out.mkdir(parents=True, exist_ok=True)
    method = {"method": "tadm last.ckpt", "images": 1, "psnr_y": 20.0 + len(ckpt.read_text()), "ssim_y": 0.5,
              "lpips": None, "dists": None, "fid": None, "kid": None, "kid_std": None, "seconds": 0.1}
    doc = {"protocol": {"name": argv[argv.index("--protocol") + 1], "crop_border": 0},
           "image_set": {"images": 1, "fingerprint": "ab" * 32},
           "model": {"checkpoint": str(ckpt.resolve()), "trainable_parameters": 7}, "methods": [method]}
    (out / "summary.json").write_text(json.dumps(doc))
'''


@pytest.fixture
def fake(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cells run a fake tadm (a real subprocess, but instant); returns the study file (3 cells, one failing
    while the file ``fail`` exists)."""
    script = _write(workdir / "fake_tadm.py", FAKE_TADM)
    monkeypatch.setattr(study_cmd, "tadm_argv", lambda: [sys.executable, str(script)])
    return _write(
        workdir / "s.yaml",
        """
        base: base.yaml
        output: out
        axes:
          x: {a: {fake.k: 1}, bad: {fake.fail: true}, cc: {fake.k: 3}}
        evaluate: {inputs: [images]}
        """,
    )


def _calls(workdir: Path) -> list[str]:
    path = workdir / "calls.txt"
    calls = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def test_a_failing_cell_is_reported_and_the_others_finish(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "fail").touch()
    assert main(["study", "run", str(fake)]) == 1
    assert _calls(workdir) == ["fit x=a", "evaluate x=a", "fit x=bad", "fit x=cc", "evaluate x=cc"]
    captured = capsys.readouterr()
    assert "1 of 3 cell(s) failed" in captured.err and "- x=bad: fit exited 1" in captured.err
    assert "the model diverged" in captured.err  # the end of the failing cell's log is shown
    assert "Traceback: the model diverged" in (workdir / "out" / "x=bad" / "fit.log").read_text()
    manifest = json.loads((workdir / "out" / "study.json").read_text())
    assert {c["name"]: c["status"] for c in manifest["cells"]} == {
        "x=a": "done",
        "x=bad": "failed",
        "x=cc": "done",
    }
    # the comparison of the finished cells ends the run
    compare_md = (workdir / "out" / "compare.md").read_text()
    assert "| x=a |" in compare_md and "| x=cc |" in compare_md and "| x=bad |" not in compare_md
    assert "Not in the table: cell `x=bad`" in compare_md
    assert "| x=a | 1 | 23.00 |" in captured.out  # psnr 20 + len("x=a")


def test_a_rerun_does_only_what_is_missing(fake: Path, workdir: Path) -> None:
    (workdir / "fail").touch()
    (workdir / "fail_eval").touch()
    assert main(["study", "run", str(fake), "--no-compare"]) == 1
    assert _calls(workdir) == ["fit x=a", "evaluate x=a", "fit x=bad", "fit x=cc", "evaluate x=cc"]
    (workdir / "fail_eval").unlink()
    assert main(["study", "run", str(fake), "--no-compare"]) == 1  # trained cells are only evaluated
    assert _calls(workdir) == ["evaluate x=a", "fit x=bad", "evaluate x=cc"]
    (workdir / "fail").unlink()
    assert main(["study", "run", str(fake), "--no-compare"]) == 0
    assert _calls(workdir) == ["fit x=bad", "evaluate x=bad"]
    assert main(["study", "run", str(fake), "--no-compare"]) == 0
    assert _calls(workdir) == []  # everything finished: kept
    fake.write_text(fake.read_text().replace("cc: {fake.k: 3}", "cc: {fake.k: 4}"))
    assert main(["study", "run", str(fake), "--no-compare"]) == 0
    assert _calls(workdir) == ["fit x=cc", "evaluate x=cc"]  # a changed cell runs again
    (workdir / "base.yaml").write_text((workdir / "base.yaml").read_text() + "seed_everything: 1\n")
    assert main(["study", "run", str(fake), "--no-compare", "--cell", "x=a"]) == 0
    assert _calls(workdir) == ["fit x=a", "evaluate x=a"]  # a changed config file: stale too


def test_plan_prints_the_commands_and_runs_nothing(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study", "plan", str(fake)]) == 0
    out = capsys.readouterr().out
    assert "3 cell(s), axes x (3); output out" in out
    assert "[2/3] x=bad: to train and evaluate" in out
    assert (
        "tadm fit --config base.yaml --fake.fail=true --trainer.logger.init_args.save_dir=out "
        "--trainer.logger.init_args.name=x=bad --trainer.default_root_dir=out/x=bad" in out
    )
    assert "tadm evaluate --ckpt out/x=bad/checkpoints/last.ckpt images --output out/x=bad/eval" in out
    assert not (workdir / "out").exists() and _calls(workdir) == []
    assert main(["study", "run", str(fake), "--cell", "x=a", "--no-compare"]) == 0
    assert main(["study", "plan", str(fake)]) == 0
    assert "[1/3] x=a: done (kept)" in capsys.readouterr().out
    assert main(["study", "plan", str(fake), "--cell", "x=zz"]) == 2


def test_a_folder_the_study_did_not_make_is_never_replaced(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "out" / "x=cc").mkdir(parents=True)
    (workdir / "out" / "x=cc" / "mine.txt").write_text("keep")
    assert main(["study", "run", str(fake)]) == 2
    assert "'out/x=cc' exists and was not made by `tadm study`" in capsys.readouterr().err
    assert _calls(workdir) == [] and (workdir / "out" / "x=cc" / "mine.txt").read_text() == "keep"


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder: its bytes and mtime (ns)."""
    return {
        str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns)
        for f in folder.rglob("*")
        if f.is_file()
    }


def test_another_study_file_never_replaces_a_studys_results_without_replace(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One output folder, one study file (its resolved path in study.json): a second study file on the same
    `output` is refused before anything is touched, unless given --replace; the owning file, however it is
    spelled and after an edit, goes on as before."""
    assert main(["study", "run", str(fake), "--no-compare"]) == 0
    assert len(_calls(workdir)) == 6
    out = workdir / "out"
    assert json.loads((out / "study.json").read_text())["study_file"] == str(fake.resolve())
    first = _snapshot(out)
    assert "x=a/checkpoints/last.ckpt" in first
    other = _write(
        workdir / "other.yaml", fake.read_text().replace("output: out", "set: {fake.seed: 2}\noutput: out")
    )
    renamed = _write(
        workdir / "renamed.yaml", fake.read_text()
    )  # the same text under another name: another study
    capsys.readouterr()
    for study in (other, renamed):
        assert main(["study", "run", str(study), "--cell", "x=a", "--no-compare"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tadm study: error: 'out' holds the results of study file")
        assert f"'{fake.resolve()}'" in err[0] and "--replace" in err[0]
        assert _snapshot(out) == first and _calls(workdir) == []  # nothing deleted, rewritten or run
    assert main(["study", "plan", str(other)]) == 0  # plan writes nothing: it says what run would do
    plan = capsys.readouterr().out
    assert f"note: 'out' holds the results of study file '{fake.resolve()}'" in plan
    assert "[1/3] x=a: to train and evaluate again" in plan
    assert _snapshot(out) == first
    # the owning file: by another spelling of its path, and after an edit (the edited cell alone runs again)
    assert main(["study", "run", "./s.yaml", "--no-compare"]) == 0
    assert _calls(workdir) == []
    fake.write_text(fake.read_text().replace("cc: {fake.k: 3}", "cc: {fake.k: 4}"))
    assert main(["study", "run", "s.yaml", "--no-compare"]) == 0
    assert _calls(workdir) == ["fit x=cc", "evaluate x=cc"]
    kept = _snapshot(out)
    # --replace: the other study takes the folder over; its changed cell is trained again
    capsys.readouterr()
    assert main(["study", "run", str(other), "--cell", "x=a", "--no-compare", "--replace"]) == 0
    assert "--replace: 'out' held the results of study file" in capsys.readouterr().out
    assert _calls(workdir) == ["fit x=a", "evaluate x=a"]
    assert (out / "x=a" / "checkpoints" / "last.ckpt").stat().st_mtime_ns != kept[
        "x=a/checkpoints/last.ckpt"
    ][1]
    assert json.loads((out / "study.json").read_text())["study_file"] == str(other.resolve())
    assert main(["study", "run", str(fake), "--no-compare"]) == 2  # now the first file is the other study
    assert str(other.resolve()) in capsys.readouterr().err and _calls(workdir) == []


def test_a_manifest_without_study_file_names_its_file_as_given(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """study.json written before the resolved path was recorded: its `study` (as given, relative to the
    working directory) says who owns the folder; an unreadable manifest is another study's."""
    assert main(["study", "run", str(fake), "--cell", "x=a", "--no-compare"]) == 0
    manifest = workdir / "out" / "study.json"
    doc = json.loads(manifest.read_text())
    del doc["study_file"]
    manifest.write_text(json.dumps({**doc, "study": "s.yaml"}))
    _calls(workdir)
    assert main(["study", "run", str(fake), "--cell", "x=a", "--no-compare"]) == 0 and _calls(workdir) == []
    manifest.write_text(json.dumps({**doc, "study": "elsewhere/s.yaml"}))
    assert main(["study", "run", str(fake), "--cell", "x=a", "--no-compare"]) == 2
    assert f"study file '{workdir / 'elsewhere' / 's.yaml'}'" in capsys.readouterr().err
    manifest.write_text("{not json")
    assert main(["study", "run", str(fake), "--cell", "x=a", "--no-compare"]) == 2
    assert "an unknown study ('out/study.json' is not readable" in capsys.readouterr().err
    assert manifest.read_text() == "{not json" and _calls(workdir) == []


def test_sigterm_stops_the_study_and_its_running_cell(
    fake: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scheduler's SIGTERM ends the study like Ctrl-C (exit 130) and kills the cell's process with it."""
    (workdir / "hang").touch()
    pid_file = workdir / "child.pid"

    def terminate_when_the_cell_runs() -> None:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    missed: list[int] = []  # a SIGTERM the study did not catch lands here instead of ending pytest
    outer = signal.signal(signal.SIGTERM, lambda signum, frame: missed.append(signum))
    try:
        killer = threading.Thread(target=terminate_when_the_cell_runs)
        killer.start()
        code = main(["study", "run", str(fake)])
        killer.join()
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert code == 130 and missed == []
    child = int(pid_file.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)
    assert "interrupted" in capsys.readouterr().err
    assert handler is not None and handler.__name__ == "<lambda>"  # the study put the previous handler back
    manifest = json.loads((workdir / "out" / "study.json").read_text())
    assert manifest["cells"][0]["status"] == "todo"  # trained again next time


@pytest.mark.slow
def test_a_real_study_trains_evaluates_and_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real subprocesses: two short quickstart cells and one whose config is invalid (exit 2)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = _write(
        tmp_path / "real.yaml",
        f"""
        base: configs/quickstart.yaml
        set: {{trainer.max_steps: 2, trainer.max_epochs: 1, trainer.limit_val_batches: 0,
               trainer.enable_progress_bar: false}}
        output: {tmp_path / "out"}
        axes:
          width: {{w8: {{model.rescaler.init_args.width: 8}}, w16: {{model.rescaler.init_args.width: 16}},
                   broken: {{model.rescaler.init_args.width: not-a-number}}}}
        evaluate: {{inputs: [assets/samples/val/coffee.png], args: [--no-fid, --no-perceptual]}}
        """,
    )
    assert main(["study", "run", str(path)]) == 1
    out = tmp_path / "out"
    cells = {c["name"]: c for c in json.loads((out / "study.json").read_text())["cells"]}
    assert {n: c["status"] for n, c in cells.items()} == {
        "width=w8": "done",
        "width=w16": "done",
        "width=broken": "failed",
    }
    params = {}
    for name in ("width=w8", "width=w16"):
        summary = json.loads((out / name / "eval" / "summary.json").read_text())
        assert summary["image_set"]["images"] == 1 and summary["model"]["stage"] == "rescaler"
        params[name] = summary["model"]["trainable_parameters"]
        assert 5 < summary["methods"][0]["psnr_y"] < 60 and summary["methods"][0]["lr_bpp"] > 0
    assert params["width=w8"] < params["width=w16"]
    table = (out / "compare.md").read_text()
    assert "| width=w8 |" in table and "| width=w16 |" in table and "bicubic x16 (reference)" in table


@pytest.mark.slow
def test_a_second_shrunk_demo_study_on_the_same_output_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe's case with real training: configs/studies/demo.yaml shrunk to 2 steps, one cell, then a
    copy with one `set` value changed on the same `output`: refused with the first study's checkpoint
    untouched; with --replace it trains the cell again."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    doc = yaml.safe_load((CONFIGS / "studies" / "demo.yaml").read_text())
    doc["set"] = {
        **doc["set"],
        "trainer.max_steps": 2,
        "trainer.max_epochs": 1,
        "trainer.limit_val_batches": 0,
    }
    doc["output"] = str(tmp_path / "out")
    doc["evaluate"] = {"inputs": ["assets/samples/val/coffee.png"], "args": ["--no-fid", "--no-perceptual"]}
    first = tmp_path / "demo.yaml"
    first.write_text(yaml.safe_dump(doc))
    doc["set"]["trainer.max_steps"] = 3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(doc))
    cell = "design=residual,width=w32"
    assert main(["study", "run", str(first), "--cell", cell, "--no-compare"]) == 0
    ckpt = tmp_path / "out" / cell / "checkpoints" / "last.ckpt"
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    snapshot = _snapshot(tmp_path / "out")
    capsys.readouterr()
    assert main(["study", "run", str(other), "--cell", cell]) == 2
    err = capsys.readouterr().err
    assert f"holds the results of study file '{first.resolve()}'" in err and "--replace" in err
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before and _snapshot(tmp_path / "out") == snapshot
    assert main(["study", "run", str(other), "--cell", cell, "--no-compare", "--replace"]) == 0
    assert ckpt.stat().st_mtime_ns != before[1]
    assert json.loads((tmp_path / "out" / "study.json").read_text())["study_file"] == str(other.resolve())
