"""A resume (``tadm fit --ckpt_path FILE``) never silently drops a typed option: options that change what the
checkpoint's weights or restored state mean are refused in one line before any work (exit 2), the others
are applied and listed; a diverged run or failed checkpoint saves exit 1 with one line."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tadm.commands import lightning as lightning_command
from tadm.commands.main import main
from tadm.errors import TrainingDiverged
from tadm.training.callbacks import earlier_checkpoints
from tadm.training.lightning_module import TADMModule
from tadm.training.resume_options import (
    APPLIED_MODEL_ARGS,
    ARCHITECTURE_MODEL_ARGS,
    RESTORED_STATE_MODEL_ARGS,
    Change,
    changed_options,
    classify,
    refusal,
    split_changes,
)
from tests.helpers import CONFIGS
from tests.helpers.cli import data_args

QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every CLI call from an empty folder: nothing may be written into the repository."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- the rules, on parsed config trees
@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("model.scale", "architecture"),
        ("model.stage", "architecture"),
        ("model.backbone.class_path", "architecture"),
        ("model.backbone.init_args.preset", "architecture"),
        ("model.backbone.init_args.pretrained", "architecture"),
        ("model.backbone.init_args.unet_lora_rank", "architecture"),
        ("model.backbone.init_args.gradient_checkpointing", "applied"),
        ("model.backbone.init_args.local_files_only", "applied"),
        ("model.rescaler.init_args.width", "architecture"),
        ("model.aligner.class_path", "architecture"),
        ("model.enhancer.init_args.mode", "architecture"),
        ("model.aligner_latents", "architecture"),
        ("model.optimizer.init_args.lr", "restored_state"),
        ("model.lr_scheduler.init_args.warmup_steps", "restored_state"),
        ("model.lr_scheduler_interval", "restored_state"),
        ("model.ema_decay", "restored_state"),
        ("model.ema_start_step", "restored_state"),
        ("model.loss_weights", "applied"),
        ("model.distance", "applied"),
        ("model.init_from", "applied"),
        ("model.num_log_images", "applied"),
        ("model.eval_tiling.init_args.tile", "applied"),
        ("model.color_fix", "applied"),
        ("model.an_option_of_a_newer_tadm", "architecture"),  # unknown: refusing is the safe side
        ("trainer.max_steps", "applied"),
        ("trainer.precision", "applied"),
        ("trainer.callbacks[0].init_args.save_last", "applied"),
        ("data.init_args.batch_size", "applied"),
    ],
)
def test_each_option_is_applied_or_refused(key: str, kind: str) -> None:
    assert classify(key) == kind


def test_every_module_argument_is_classified() -> None:
    """A new TADMModule argument must be sorted into one list (else a resume refuses any change of it)."""
    args = set(inspect.signature(TADMModule.__init__).parameters) - {"self"}
    lists = (APPLIED_MODEL_ARGS, ARCHITECTURE_MODEL_ARGS, RESTORED_STATE_MODEL_ARGS)
    assert args == set().union(*lists)
    assert sum(map(len, lists)) == len(args)  # and into one only


STORED = {
    "seed_everything": 0,
    "ckpt_path": None,
    "model": {
        "scale": 16,
        "backbone": {"class_path": "space_to_depth", "init_args": {"factor": 8}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "betas": [0.9, 0.999]}},
        "lr_scheduler": None,
        "loss_weights": {"lr": 3.0, "latent_forward": 1.0},
        "num_log_images": 4,
        "ema_decay": None,
    },
    "data": {"class_path": "ImageFolderDataModule", "init_args": {"batch_size": 8}},
    "trainer": {
        "max_steps": 40,
        "callbacks": [{"class_path": "RunCheckpoint", "init_args": {"save_last": True}}],
        "logger": False,
    },
}


def _typed(**changes: object) -> dict:
    """STORED with dotted keys set to other values."""
    tree = copy.deepcopy(STORED)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = tree
        for p in parents:
            node = node[p]
        node[leaf] = value
    return tree


def test_the_same_config_changes_nothing() -> None:
    assert changed_options(_typed(ckpt_path="last.ckpt", seed_everything=3), STORED) == []


def test_changes_are_named_with_both_values_and_sorted() -> None:
    typed = _typed(
        model__scale=32,
        model__num_log_images=2,
        trainer__max_steps=100,
        data__init_args__batch_size=4,
    )
    typed["model"]["optimizer"]["init_args"]["lr"] = 1e-4
    changes = changed_options(typed, STORED)
    assert list(map(str, changes)) == [
        "model.scale 16 -> 32",
        "model.optimizer.init_args.lr 0.001 -> 0.0001",
        "model.num_log_images 4 -> 2",
        "data.init_args.batch_size 8 -> 4",
        "trainer.max_steps 40 -> 100",
    ]
    applied, refused = split_changes(changes, fitting=True)
    assert [c.key for c in refused] == ["model.scale", "model.optimizer.init_args.lr"]
    assert [c.key for c in applied] == [
        "model.num_log_images",
        "data.init_args.batch_size",
        "trainer.max_steps",
    ]
    # evaluation restores only the weights: the optimiser does not matter there, the scale still does
    applied, refused = split_changes(changes, fitting=False)
    assert [c.key for c in refused] == ["model.scale"]
    assert "model.optimizer.init_args.lr" in [c.key for c in applied]


def test_keys_only_one_config_has_are_not_compared() -> None:
    typed = _typed()
    typed["model"]["backbone"]["init_args"]["new_in_a_newer_tadm"] = True  # typed only
    typed["trainer"]["new_trainer_flag"] = 1
    del typed["model"]["num_log_images"]  # stored only
    assert changed_options(typed, STORED) == []


def test_whole_values_where_the_structure_differs() -> None:
    """``null`` against a mapping, a list of another length, a loss-weight mapping with other keys: one
    change of the whole option, not a silent skip."""
    typed = _typed()
    typed["model"]["lr_scheduler"] = {"class_path": "WarmupCosineLR", "init_args": {"warmup_steps": 10}}
    typed["model"]["loss_weights"] = {"lr": 3.0, "latent_forward": 1.0, "latent_backward": 1.0}
    typed["trainer"]["callbacks"] = [*typed["trainer"]["callbacks"], {"class_path": "RoundTripReport"}]
    typed["model"]["optimizer"]["init_args"]["betas"] = [0.9, 0.99]
    keys = [c.key for c in changed_options(typed, STORED)]
    assert keys == [
        "model.optimizer.init_args.betas",
        "model.lr_scheduler",
        "model.loss_weights",
        "trainer.callbacks",
    ]
    # 1 and 1.0 are the same value; true and 1 are not
    assert changed_options(_typed(model__num_log_images=4.0), STORED) == []
    assert [c.key for c in changed_options(_typed(trainer__logger=0), STORED)] == ["trainer.logger"]


def test_the_refusal_is_one_line_with_what_to_do() -> None:
    line = refusal("runs/q/checkpoints/last.ckpt", [Change("model.scale", 16, 32)], fitting=True)
    assert line == (
        "cannot resume runs/q/checkpoints/last.ckpt with changed options (they change what the stored "
        "weights mean): model.scale 16 -> 32; start a new run with --model.init_from "
        "runs/q/checkpoints/last.ckpt instead, or drop these options"
    )
    line = refusal("c.ckpt", [Change("model.optimizer.init_args.lr", 0.001, None)], fitting=True)
    assert "optimiser, LR schedule and EMA state would override them" in line
    assert "model.optimizer.init_args.lr 0.001 -> null" in line and "\n" not in line


# ---------------------------------------------------------------- the real CLI: fit, then resume
def _fit(save_dir: Path, *extra: str) -> int:
    """``tadm fit`` of the quickstart, shrunk to seconds; checkpoints in ``save_dir/quickstart/checkpoints``."""
    return main(
        [
            "fit",
            "--config",
            QUICKSTART,
            f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.train_repeats=1",
            "--model.rescaler.init_args.width=32",
            "--model.rescaler.init_args.num_resblocks=1",
            "--model.rescaler.init_args.num_couplings=2",
            *data_args(batch=2),
            *extra,
        ]
    )


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("given", ["file", "last"])
def test_resume_refuses_a_changed_scale_and_lr_before_any_work(
    given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also with ``--ckpt_path last`` (what a restart script gives): the run's last.ckpt is compared."""
    runs = tmp_path / "runs"
    assert _fit(runs, "--trainer.max_steps=2") == 0
    last = runs / "quickstart" / "checkpoints" / "last.ckpt"
    before = _files(runs)
    capsys.readouterr()
    code = _fit(
        runs,
        "--trainer.max_steps=4",
        "--model.scale=32",
        "--model.optimizer.init_args.lr=1e-4",
        f"--ckpt_path={last if given == 'file' else 'last'}",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"tadm: error: cannot resume {last} with changed options (they change what the stored weights "
        "mean; the checkpoint's optimiser, LR schedule and EMA state would override them): model.scale 16 "
        f"-> 32, model.optimizer.init_args.lr 0.001 -> 0.0001; start a new run with --model.init_from {last} "
        "instead, or drop these options"
    ]
    assert _files(runs) == before  # nothing trained, logged or saved: no version_1, the same last.ckpt
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_resume_applies_safe_changes_and_lists_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert _fit(runs, "--trainer.max_steps=2") == 0
    run = runs / "quickstart"
    last = run / "checkpoints" / "last.ckpt"
    caplog.set_level(logging.INFO, logger="tadm")
    # num_log_images is one of the checkpoint's hyper-parameters: LightningCLI re-parsed them over it
    assert _fit(runs, "--trainer.max_steps=4", "--model.num_log_images=2", f"--ckpt_path={last}") == 0
    lines = [r.getMessage() for r in caplog.records if "changed options" in r.getMessage()]
    assert lines == ["resuming with changed options: model.num_log_images 4 -> 2, trainer.max_steps 2 -> 4"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4  # trained on to the new max_steps
    for text in (
        (run / "checkpoints" / "config.yaml").read_text(),
        (run / "version_1" / "config.yaml").read_text(),
        ckpt["tadm"]["config"],
    ):
        config = yaml.safe_load(text)
        assert config["trainer"]["max_steps"] == 4
        assert config["model"]["num_log_images"] == 2


# ---------------------------------------------------------------- a fresh run never replaces an earlier one
def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints_and_last_resumes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    folder = runs / "quickstart" / "checkpoints"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _fit(runs, "--trainer.max_steps=2") == 0
    # Lightning's warning about a non-empty folder came on every run (our config.yaml is written first)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    before = _files(runs)
    capsys.readouterr()
    assert _fit(runs, "--trainer.max_steps=4") == 2  # a rerun that forgot --ckpt_path
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"tadm: error: '{folder}' holds an earlier run's checkpoints (last.ckpt, step 2, saved "
    )
    assert f"--ckpt_path {folder / 'last.ckpt'}" in err[0] and "--ckpt_path last" in err[0]
    assert _files(runs) == before  # nothing written, nothing replaced
    assert _fit(runs, "--trainer.fast_dev_run=1") == 0  # a smoke test of the config saves no checkpoint
    assert {k: v for k, v in _files(runs).items() if "checkpoints" in k} == {
        k: v for k, v in before.items() if "checkpoints" in k
    }
    # `--ckpt_path last` finds the run's own last.ckpt (Lightning looked in its default folder, found none,
    # and started the run over, replacing it)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _fit(runs, "--trainer.max_steps=3", "--ckpt_path=last") == 0
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    assert any(
        f"Restored all states from the checkpoint at {folder / 'last.ckpt'}" in r.getMessage()
        for r in caplog.records
    )
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3


def test_earlier_checkpoints_are_finished_ckpt_files_newest_first(tmp_path: Path) -> None:
    assert earlier_checkpoints(tmp_path / "missing") == []
    (tmp_path / "config.yaml").write_text("a: 1")
    (tmp_path / ".last.ckpt.k3j2.tmp").write_bytes(b"cut short")  # an interrupted save's temp file
    assert earlier_checkpoints(tmp_path) == []
    for i, name in enumerate(["epoch=0.ckpt", "last.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
    assert earlier_checkpoints(tmp_path) == [str(tmp_path / "last.ckpt"), str(tmp_path / "epoch=0.ckpt")]


# ---------------------------------------------------------------- exit codes of runs that went wrong
def test_a_diverged_run_exits_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def diverge(self: TADMModule, batch: object, batch_idx: int) -> None:
        raise TrainingDiverged("training diverged at step 1: 3 steps in a row with a non-finite loss")

    monkeypatch.setattr(TADMModule, "training_step", diverge)
    code = _fit(tmp_path / "runs", "--trainer.max_steps=2")
    err = capsys.readouterr().err
    assert code == 1
    assert [x for x in err.splitlines() if "tadm:" in x] == [
        "tadm: error: training diverged at step 1: 3 steps in a row with a non-finite loss"
    ]
    assert "Traceback" not in err


def test_failed_checkpoint_saves_exit_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = object()
    failures = {id(trainer): ["could not write last.ckpt: No space left on device"]}
    monkeypatch.setattr(lightning_command, "checkpoint_save_failures", lambda t: failures.get(id(t), []))
    monkeypatch.setattr(lightning_command, "_run_cli", lambda args: types.SimpleNamespace(trainer=trainer))
    assert lightning_command.lightning_main(["fit"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "tadm: error: 1 checkpoint save(s) failed; could not write last.ckpt: No space left on device"
    ]
    failures.clear()
    assert lightning_command.lightning_main(["fit"]) == 0
