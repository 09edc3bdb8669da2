"""A plug-in in a package of its own (examples/tadm-example-aligner) works once installed, with no change
to tadm: its entry point in group ``tadm.plugins`` registers the short name, ``tadm list`` shows it,
``tadm fit`` trains with it chosen by that name in YAML, and the package's own tests (tadm.testing's
contract checks, in one line) pass against the installed package.

The package is really built and installed (``pip install --no-deps --target``, about 2 s) into a temporary
folder that the subprocesses get on ``PYTHONPATH``: importlib.metadata finds its ``.dist-info`` there
exactly as in a site-packages, and neither this process's registries nor the venv are touched.
CONTRIBUTING.md shows the package's files; a test checks they are shown verbatim.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tadm.model.checkpoints import read_checkpoint
from tests.helpers import REPO
from tests.helpers.cli import stage_args

EXAMPLE = REPO / "examples" / "tadm-example-aligner"
CLASS = "tadm_example_aligner.LatentStatsAligner"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a folder of its own (built from a copy: no build/ here)."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, root / "source")
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, text=True)
    return target


def _tadm(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tadm.commands.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_installed_package_declares_the_entry_point(site: Path) -> None:
    dist = next(site.glob("tadm_example_aligner-*.dist-info"))
    assert "[tadm.plugins]\nexample_stats = tadm_example_aligner" in (dist / "entry_points.txt").read_text()


def test_list_shows_the_installed_plugin(site: Path, tmp_path: Path) -> None:
    done = _tadm(["list"], site, tmp_path)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "example_stats" in line)
    assert "aligner" in row and CLASS in row and "One timestep per image" in row


@pytest.mark.slow  # ~20 s: a full `tadm fit` subprocess
def test_fit_trains_with_the_plugin_chosen_by_short_name(site: Path, tmp_path: Path) -> None:
    """One stage-2 step on the tiny SD 2.1 twin with ``class_path: example_stats`` from the example's YAML.
    A narrow t range makes the logged timestep prove the plug-in's forward ran; the checkpoint holds its
    trained parameters and the run config names its class."""
    extra = [
        "--config",
        str(EXAMPLE / "aligner.yaml"),
        "--model.aligner.init_args.t_min=123.0",
        "--model.aligner.init_args.t_max=123.5",
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=tadm.training.callbacks.RunCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    done = _tadm(["fit", *stage_args(root=tmp_path, extra=extra)], site, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    t_mean = [float(r["train/t_mean"]) for r in rows if r.get("train/t_mean")]
    assert len(t_mean) == 1 and 123.0 <= t_mean[0] <= 123.5, t_mean
    state, meta = read_checkpoint(next(tmp_path.rglob("*.ckpt")))
    assert state["aligner.linear.weight"].shape == (1, 8) and state["aligner.linear.bias"].shape == (1,)
    assert torch.isfinite(state["aligner.linear.weight"]).all()
    assert f"class_path: {CLASS}" in meta["config"]


@pytest.mark.slow  # ~25 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_the_package_passes_its_own_contract_tests(site: Path, tmp_path: Path) -> None:
    """The example's ``tests/`` run as its author runs them (``pytest tests``, outside this repository)
    against the installed package: ``tadm.testing.check_aligner`` on its aligner passes."""
    tests = site.parent / "source" / "tests"
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout[-1000:]


def test_study_file_puts_the_plugin_beside_the_tpm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's study file plans one cell per aligner (``tadm study plan`` needs no plug-in installed)."""
    from tadm.studies.study_plan import load_study

    monkeypatch.chdir(REPO)  # study paths are relative to the working directory
    cells = {c.name: c for c in load_study("examples/tadm-example-aligner/study.yaml").cells()}
    assert set(cells) == {"aligner=tpm", "aligner=example_stats"}
    assert "examples/tadm-example-aligner/aligner.yaml" in cells["aligner=example_stats"].fit_args
    assert "configs/aligner/tpm.yaml" in cells["aligner=tpm"].fit_args


def test_contributing_shows_the_example_files_verbatim() -> None:
    """CONTRIBUTING.md's walk-through is the code the tests above install (no copy drifts)."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    shown = dict(re.findall(r"`(examples/[^`]+)`:\n```\w*\n(.*?)```", text, flags=re.S))
    files = {p.relative_to(REPO).as_posix() for p in EXAMPLE.rglob("*") if p.is_file()}
    files = {f for f in files if "__pycache__" not in f and ".egg-info" not in f and "/build/" not in f}
    assert set(shown) == files, f"CONTRIBUTING.md shows {sorted(shown)}, the example has {sorted(files)}"
    for rel, block in shown.items():
        assert block == (REPO / rel).read_text(), f"CONTRIBUTING.md's copy of {rel} differs from the file"
