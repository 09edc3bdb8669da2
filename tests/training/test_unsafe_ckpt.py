"""``tadm fit|validate --ckpt_path FILE`` with a file whose unpickling would run code: tadm reads the file
(weights only) before Lightning does, so the run stops before anything is built, trained or written, in
one line that names the object (exit 2), and nothing runs. ``model.init_from`` refuses it the same way.
A checkpoint whose stored run config is not one (bad YAML, ``model: 5``) is refused in one line too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tadm.commands.main import main
from tests.helpers import CONFIGS
from tests.helpers.cli import data_args
from tests.helpers.pickles import write_evil

QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every CLI call from an empty folder: nothing may be written into the repository."""
    monkeypatch.chdir(tmp_path)


def _run(subcommand: str, runs: Path, *extra: str) -> int:
    """``tadm SUBCOMMAND`` of the quickstart, shrunk to seconds (as ``test_resume_options``)."""
    return main(
        [
            subcommand,
            "--config",
            QUICKSTART,
            f"--trainer.logger.init_args.save_dir={runs}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=1",
            "--data.init_args.train_repeats=1",
            "--model.rescaler.init_args.width=32",
            "--model.rescaler.init_args.num_resblocks=1",
            "--model.rescaler.init_args.num_couplings=2",
            *data_args(batch=2),
            *extra,
        ]
    )


@pytest.mark.parametrize("fmt", ["torch.save", "pickle default protocol"])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_that_would_run_code_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], subcommand: str, fmt: str
) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    name = write_evil(evil, "os.system", marker, fmt)
    runs = tmp_path / "runs"
    code = _run(subcommand, runs, f"--ckpt_path={evil}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"tadm: error: --ckpt_path: refusing to load '{evil}'"), err
    assert f"it holds {name}" in err[0]
    assert not marker.exists()
    assert not runs.exists()  # nothing built, logged or trained


def test_init_from_that_would_run_code_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    name = write_evil(evil, "eval", marker)
    code = _run("fit", tmp_path / "runs", f"--model.init_from={evil}")
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if "tadm:" in x or "Error" in x]
    assert len(lines) == 1 and lines[0].startswith(f"tadm: error: refusing to load '{evil}': it holds {name}")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model: [", "its stored run config is not valid YAML"),
        ("model: 5", "the 'model' section of its stored run config is an int (5)"),
        ("[]", "its stored run config is a list ([])"),
    ],
)
def test_ckpt_path_whose_stored_config_is_no_run_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "tadm": {"stage": "rescaler", "scale": 16, "config": config}}, bad)
    runs = tmp_path / "runs"
    code = _run("fit", runs, f"--ckpt_path={bad}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"tadm: error: --ckpt_path: checkpoint {bad}: {message}" + err[0].split(message, 1)[1]]
    assert not runs.exists()
