"""LR schedules (:mod:`tadm.training.schedules`): the cosine schedule follows the run's length, on a resume too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tadm.training.schedules import PiecewiseConstantLR, WarmupCosineLR


def _cosine(total: int | None, warmup: int = 2, lr: float = 1.0) -> WarmupCosineLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=lr)
    sched = WarmupCosineLR(opt, warmup_steps=warmup, total_steps=total)
    return sched


def _advance(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()


def _expected(step: int, total: int, warmup: int = 2) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_warmup_then_cosine_to_the_floor() -> None:
    sched = _cosine(total=10)
    lrs = []
    for _ in range(12):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        _advance(sched, 1)
    assert lrs == pytest.approx([_expected(s, 10) for s in range(12)])
    assert lrs[1] == 1.0 and lrs[10] == lrs[11] == pytest.approx(0.0)


def test_a_resume_with_a_longer_run_decays_over_the_new_length() -> None:
    """A run of 8 steps saved at step 6, resumed with 20: without this the checkpoint's total (8) comes back
    and every step from 8 on runs at the LR floor (0); the LR of step 6 follows the new length at once."""
    first = _cosine(total=None)
    first.follow_run_length(8)
    _advance(first, 6)
    state = first.state_dict()
    assert state["total_steps"] == 8

    resumed = _cosine(total=None)
    resumed.follow_run_length(20)
    resumed.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # the optimiser's restore
    resumed.load_state_dict(state)
    assert resumed.total_steps == 20 and resumed.follows_run and resumed.last_epoch == 6
    lrs = []
    for _ in range(14):
        lrs.append(resumed.optimizer.param_groups[0]["lr"])
        _advance(resumed, 1)
    assert lrs == pytest.approx([_expected(s, 20) for s in range(6, 20)])
    assert min(lrs[:-1]) > 0.0


def test_an_unchanged_length_or_a_typed_total_resumes_as_saved() -> None:
    first = _cosine(total=None)
    first.follow_run_length(10)
    _advance(first, 4)
    same = _cosine(total=None)
    same.follow_run_length(10)
    same.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]
    same.load_state_dict(first.state_dict())
    assert same.state_dict() == first.state_dict()
    assert same.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]

    typed = _cosine(total=10)
    _advance(typed, 4)
    other = _cosine(total=30)  # a typed total is an option of the schedule: the checkpoint's comes back
    other.load_state_dict(typed.state_dict())
    assert other.total_steps == 10 and not other.follows_run


def test_piecewise_constant_multipliers_and_bad_arguments() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=2.0)
    sched = PiecewiseConstantLR(opt, boundaries=[2, 4], multipliers=[0.5, 0.25], final=1.0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        _advance(sched, 1)
    assert lrs == [1.0, 1.0, 0.5, 0.5, 2.0, 2.0]
    with pytest.raises(ValueError, match="one multiplier per boundary"):
        PiecewiseConstantLR(opt, boundaries=[1], multipliers=[])
    with pytest.raises(ValueError, match="must increase"):
        PiecewiseConstantLR(opt, boundaries=[3, 1], multipliers=[1.0, 1.0])


def test_the_quickstart_resumed_with_more_steps_keeps_learning(tmp_path: Path, one_thread: None) -> None:
    """``tadm fit`` on configs/quickstart.yaml for 3 steps, resumed with ``--trainer.max_steps 6``: the
    schedule decays over 6 steps (the checkpoint said 3), so steps 3-5 do not all run at LR 0."""
    from tadm.commands.lightning import lightning_main
    from tests.helpers import CONFIGS, TRAIN, VAL
    from tests.helpers.recorders import batch_log

    def args(out: Path, steps: int) -> list[str]:
        return [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            f"--data.init_args.train_dir={TRAIN}",
            f"--data.init_args.val_dir={VAL}",
            "--data.init_args.crop_size=64",
            "--data.init_args.batch_size=2",
            "--model.rescaler.init_args.width=16",
            "--model.rescaler.init_args.num_resblocks=1",
            "--model.lr_scheduler.init_args.warmup_steps=1",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
            '--trainer.callbacks=[{"class_path": "tadm.training.callbacks.RunCheckpoint", "init_args": '
            '{"save_last": true}}, {"class_path": "tests.helpers.recorders.BatchLog", "init_args": {"out": "'
            + str(out / "batches")
            + '"}}]',
        ]

    assert lightning_main(args(tmp_path / "a", 3)) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["lr_schedulers"][0]["total_steps"] == 3
    assert lightning_main([*args(tmp_path / "b", 6), f"--ckpt_path={ckpt}"]) == 0
    lrs = [row["lr"] for row in batch_log(tmp_path / "b" / "batches")]
    assert lrs == pytest.approx([1e-3 * _expected(s, 6, warmup=1) for s in range(3, 6)])
    assert min(lrs) > 0.0
    final = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 6 and final["lr_schedulers"][0]["total_steps"] == 6
