"""A non-finite loss or gradient never reaches the weights: the step is skipped and counted, a run that
keeps diverging stops with one line and a non-zero exit, and no checkpoint is written with NaN/inf."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import tadm.training.lightning_module as lightning_module
from tadm.commands.main import main
from tadm.errors import TrainingDiverged
from tadm.training.nonfinite import NonFiniteGuard, describe_non_finite, non_finite_tensors
from tests.helpers import CONFIGS
from tests.helpers.cli import build_cli, data_args

QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- the guard alone
def _param(value: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), value)
    return p


def _agree(ok: bool) -> bool:
    return ok


def test_guard_names_the_terms_counts_in_a_row_and_resets_on_a_finite_step() -> None:
    guard = NonFiniteGuard(max_in_a_row=2)
    finite = {"lr": torch.tensor(1.0), "latent_forward": torch.tensor(2.0)}
    guard.note_loss(finite, torch.tensor(3.0))
    assert guard.check_step([_param(1.0)], _agree) and guard.in_a_row == 0 and not guard.step_skipped
    guard.end_step()
    guard.note_loss(
        {"lr": torch.tensor(float("nan")), "latent_forward": torch.tensor(1.0)}, torch.tensor(float("nan"))
    )
    assert guard.bad_terms() == ["lr", "loss"]
    assert not guard.check_step([_param(1.0)], _agree) and guard.step_skipped
    assert (guard.in_a_row, guard.total, guard.must_stop) == (1, 1, False)
    guard.end_step()
    guard.note_loss(finite, torch.tensor(3.0))  # finite loss, infinite gradients
    assert not guard.check_step([_param(float("inf"))], _agree)
    assert guard.bad_terms() == ["gradients"] and (guard.in_a_row, guard.total, guard.must_stop) == (
        2,
        2,
        True,
    )
    guard.end_step()
    guard.note_loss(finite, torch.tensor(3.0))
    assert guard.check_step([_param(1.0)], _agree) and (guard.in_a_row, guard.total) == (0, 2)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


def test_every_rank_skips_when_one_rank_is_not_finite() -> None:
    """The decision is the ranks' AND (``reduce_boolean_decision(all=True)``): a finite rank skips too."""
    guard = NonFiniteGuard(max_in_a_row=3)
    guard.note_loss({"pixel": torch.tensor(1.0)}, torch.tensor(1.0))
    seen: list[bool] = []

    def another_rank_diverged(ok: bool) -> bool:
        seen.append(ok)
        return False

    assert not guard.check_step([_param(1.0)], another_rank_diverged)
    assert seen == [True] and guard.step_skipped and guard.total == 1 and guard.bad_terms() == []


def test_under_a_grad_scaler_overflowing_gradients_are_not_divergence() -> None:
    """fp16: the scaler skips overflow steps and lowers its scale by design; only a non-finite loss counts."""
    guard = NonFiniteGuard(max_in_a_row=1)
    guard.note_loss({"pixel": torch.tensor(1.0)}, torch.tensor(1.0))
    assert guard.check_step([_param(float("inf"))], _agree, check_gradients=False)
    guard.end_step()
    guard.note_loss({"pixel": torch.tensor(float("inf"))}, torch.tensor(float("inf")))
    assert not guard.check_step([_param(1.0)], _agree, check_gradients=False) and guard.must_stop


def test_non_finite_tensors_counts_per_tensor() -> None:
    state = {
        "a": torch.tensor([1.0, float("nan"), float("inf")]),
        "b": torch.ones(2),
        "c": torch.tensor([float("-inf")]),
        "steps": torch.tensor([3]),  # integer tensors cannot hold NaN
    }
    bad = non_finite_tensors(state)
    assert bad == [("a", 2), ("c", 1)]
    assert describe_non_finite(bad) == "3 non-finite values in 2 tensor(s) (a: 2, c: 1)"


# ---------------------------------------------------------------- in a real fit
class StepRecorder(L.Callback):
    """The trained tensors and the EMA after every optimiser step, and what was logged."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.emas: list[dict[str, torch.Tensor]] = []
        self.skipped: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_trainable_parameters()})
        if pl_module.ema is not None:
            self.emas.append({k: v.clone() for k, v in pl_module.ema.weights().items()})
        self.skipped.append(float(trainer.callback_metrics["train/skipped_steps"]))


def _quickstart(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config",
        QUICKSTART,
        *data_args(crop=64, batch=2),
        "--data.init_args.train_repeats=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp}",
        *extra,
    ]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # 16-mixed: Lightning uses bf16 on a CPU
def test_one_nan_step_is_skipped_and_leaves_weights_and_ema_alone(
    precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss of the 2nd step is NaN: the weights and the EMA after it equal those after the 1st, it is
    counted in ``train/skipped_steps``, and the run trains on to its last step."""
    weighted_sum = lightning_module.weighted_sum
    calls = {"n": 0}

    def nan_on_the_second_step(terms: dict, weights: dict) -> torch.Tensor:
        calls["n"] += 1
        loss = weighted_sum(terms, weights)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(lightning_module, "weighted_sum", nan_on_the_second_step)
    cli = build_cli(
        _quickstart(
            tmp_path, "--trainer.max_steps=4", "--model.ema_decay=0.9", f"--trainer.precision={precision}"
        )
    )
    recorder = StepRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4 and len(recorder.weights) == 4
    assert recorder.skipped == [0.0, 1.0, 1.0, 1.0]
    first, skipped, third = recorder.weights[0], recorder.weights[1], recorder.weights[2]
    assert all(torch.equal(first[n], skipped[n]) for n in first)
    assert any(not torch.equal(skipped[n], third[n]) for n in first)  # training went on
    assert all(torch.equal(recorder.emas[0][n], recorder.emas[1][n]) for n in recorder.emas[0])
    assert all(torch.isfinite(w).all() for w in recorder.weights[-1].values())


def test_a_diverging_run_stops_with_one_line_exit_1_and_no_non_finite_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's command: the quickstart at lr 1e4 for 40 steps (a checkpoint every step). It used to
    log ``train/loss: nan``, exit 0 and write a ``last.ckpt`` full of NaNs."""
    ckpt_dir = tmp_path / "ckpt"
    callbacks = [
        {
            "class_path": "tadm.training.callbacks.RunCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 1},
        }
    ]
    args = _quickstart(tmp_path, "--trainer.max_steps=40", "--model.optimizer.init_args.lr=1e4")
    args = [a for a in args if not a.startswith(("--trainer.callbacks", "--trainer.enable_checkpointing"))]
    code = main(["fit", *args, "--trainer.callbacks=" + json.dumps(callbacks)])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("tadm: error:")]
    assert "training diverged" in line and "3 optimiser steps in a row" in line, line
    assert "non-finite" in line and "loss" in line and "last.ckpt" in line, line
    assert "Traceback" not in err
    saved = sorted(ckpt_dir.glob("*.ckpt"))
    assert saved, "no checkpoint was saved before the divergence"
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert not non_finite_tensors(ckpt["state_dict"]), path
        assert ckpt["global_step"] < 40


def test_a_checkpoint_with_non_finite_weights_is_refused_before_writing(tmp_path: Path) -> None:
    """The check before every save: NaN weights put there by any means (here by hand) are never written."""
    cli = build_cli(_quickstart(tmp_path, "--trainer.max_steps=1"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    name, param = cli.model.named_trainable_parameters()[0]
    with torch.no_grad():
        param.view(-1)[:5] = float("nan")
    target = tmp_path / "nan.ckpt"
    with pytest.raises(
        TrainingDiverged, match=rf"refusing to save a checkpoint at step 1: 5 non-finite .*{name}"
    ):
        cli.trainer.save_checkpoint(target)
    assert not target.exists()


DDP_SCRIPT = """
import os, sys
import tadm.training.lightning_module as lightning_module
from tadm.commands.main import main

weighted_sum = lightning_module.weighted_sum

def nan_on_rank_1(terms, weights):
    loss = weighted_sum(terms, weights)
    return loss * float("nan") if os.environ.get("LOCAL_RANK", "0") == "1" else loss

lightning_module.weighted_sum = nan_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # two processes (DDP, gloo on the CPU): ~30 s
def test_under_ddp_a_nan_on_one_rank_stops_every_rank_together(tmp_path: Path) -> None:
    """Rank 1's loss is always NaN, rank 0's never: both ranks skip the same steps and stop together after
    three (no rank waits in a collective the other left: the run ends within the timeout), exit 1."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(DDP_SCRIPT)
    args = _quickstart(tmp_path, "--trainer.max_steps=20", "--trainer.devices=2", "--trainer.strategy=ddp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script), "fit", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("tadm: error: training diverged")]
    assert lines and all("3 optimiser steps in a row up to step 3" in x for x in lines), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
