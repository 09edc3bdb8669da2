"""SIGTERM (what Kubernetes and most schedulers send) saves a resumable checkpoint at the next step
boundary and exits 143 with one line naming it; resuming from it trains on to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tadm.commands.main import main
from tests.helpers import CONFIGS, REPO
from tests.helpers.cli import data_args


def _fit_args(run: Path, max_steps: int, extra: list[dict] | None = None) -> list[str]:
    callbacks = [
        {
            "class_path": "tadm.training.callbacks.RunCheckpoint",
            "init_args": {"dirpath": str(run / "ckpt"), "save_last": True, "every_n_train_steps": 2},
        },
        *(extra or []),
    ]
    return [
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        *data_args(crop=64, batch=2),
        "--data.init_args.train_repeats=50",
        "--trainer.logger=false",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.default_root_dir={run}",
        "--trainer.callbacks=" + json.dumps(callbacks),
    ]


def _tadm(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "tadm", *args],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def test_sigterm_in_process_saves_at_the_step_boundary_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fast half: ``tadm fit`` in this process sends itself SIGTERM after step 3: exit 143, one line, a
    ``last.ckpt`` of step 3 (not of the epoch's end), and a resume from it trains on to step 5."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = _fit_args(
        run,
        max_steps=10_000,
        extra=[{"class_path": "tests.helpers.signals.SignalAtStep", "init_args": {"step": 3}}],
    )
    assert main(args) == 143
    err = capsys.readouterr().err
    last = run / "ckpt" / "last.ckpt"
    (line,) = [x for x in err.splitlines() if "SIGTERM received" in x]
    assert line == (
        f"tadm: SIGTERM received: saved a resumable checkpoint at step 3 to {last}; resume with --ckpt_path {last}"
    )
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert main([*_fit_args(run, max_steps=5), "--ckpt_path", str(last)]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 5


@pytest.mark.slow  # two `tadm fit` subprocesses (~30 s): the signal from outside, as a scheduler sends it
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _tadm(_fit_args(run, max_steps=10_000), tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not list((run / "ckpt").glob("*step=2*.ckpt")):  # it trains: the step-2 checkpoint is there
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 2 within 4 minutes"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    (line,) = [x for x in err.splitlines() if "SIGTERM received" in x]
    last = run / "ckpt" / "last.ckpt"
    assert line.startswith("tadm: ") and f"to {last}" in line and f"--ckpt_path {last}" in line, line
    assert "Traceback" not in err
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    assert 2 <= step < 10_000 and f"at step {step} " in line
    # a scheduler restarts the job with --ckpt_path: it goes on from that step to the end
    resumed = _tadm([*_fit_args(run, max_steps=step + 2), "--ckpt_path", str(last)], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == step + 2
