"""Elastic resume through the shipped quickstart config (its cosine schedule) and the real ``tadm fit``.

``WarmupCosineLR(total_steps: null)`` makes ``configure_optimizers`` read ``trainer.estimated_stepping_batches``,
so Lightning builds the training loader before it restores its loops: the elastic conversion must survive
Lightning's own restore (``tadm.datamodules.elastic.pending_fit_loop``). 12 images, crop 64, batch 2, one sample
per image per epoch, two epochs, no validation, a checkpoint every step.

Fast: one process resumes a checkpoint that says two ranks wrote it (the counters a 2-rank run saves), for
both data modules. Slow: the issue's reproducers as written, ``torchrun --nproc-per-node 2 -m tadm fit`` and
``python -m tadm fit``, 2 -> 1 and 1 -> 2 for both data modules.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tadm.datamodules.elastic import ElasticResumeWarning
from tests.helpers import CONFIGS, REPO
from tests.helpers.recorders import batch_log, samples_per_epoch

IMAGES = 12
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 distinct photos, and the same as shards of 4."""
    from tests.helpers.shards import write_images

    root = tmp_path_factory.mktemp("elastic_cli")
    write_images(root / "photos", [(96, 96)] * IMAGES)
    code = subprocess.run(
        [sys.executable, "-m", "tadm", "shard", str(root / "photos"), str(root / "shards"), "--maxcount", "4"]
        + ["--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert code.returncode == 0, code.stderr
    assert len(list((root / "shards").glob("*.tar"))) == 3
    return root


def fit_args(kind: str, data: Path, out: Path, max_steps: int, ckpt: Path | None = None) -> list[str]:
    """``tadm fit`` on configs/quickstart.yaml (+ configs/data/webdataset.yaml), shrunk as the issue's runs."""
    callbacks = [
        {
            "class_path": "tadm.training.callbacks.RunCheckpoint",
            "init_args": {
                "every_n_train_steps": 1,
                "save_top_k": -1,
                "filename": "{step}",
                "save_last": True,
            },
        },
        {"class_path": "tests.helpers.recorders.BatchLog", "init_args": {"out": str(out / "batches")}},
    ]
    args = ["--config", str(CONFIGS / "quickstart.yaml")]
    if kind == "shards":
        args += ["--config", str(CONFIGS / "data" / "webdataset.yaml")]
        args += [
            f"--data.init_args.{k}={v}"
            for k, v in (("train_shards", data / "shards"), ("val_shards", data / "shards"))
        ]
        args += ["--data.init_args.num_workers=0", "--data.init_args.shuffle_buffer=4"]
    else:
        args += [
            f"--data.init_args.train_dir={data / 'photos'}",
            f"--data.init_args.val_dir={data / 'photos'}",
        ]
        args += ["--data.init_args.train_repeats=1"]
    args += [
        "--data.init_args.crop_size=64",
        "--data.init_args.batch_size=2",
        "--model.rescaler.init_args.width=16",  # the quickstart's DFRM, slimmed: the schedule is the point
        "--model.rescaler.init_args.num_resblocks=1",
        "--trainer.max_epochs=2",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    return args + ([f"--ckpt_path={ckpt}"] if ckpt else [])


def _final_step(out: Path) -> int:
    return int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"])


# ------------------------------------------------------------------------------------------------------------
# fast: one process, a checkpoint as two ranks write it


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_two_rank_quickstart_checkpoint_goes_on_in_one_process(
    kind: str, data: Path, tmp_path: Path, one_thread: None
) -> None:
    """Two ranks had run 2 batches each (8 of 12 samples): one process serves the 4 left, then a whole
    epoch; the run ends at step 2 + 2 + 6 = 10 and warns once, naming the position it really resumed at."""
    from tadm.commands.lightning import lightning_main

    assert lightning_main(["fit", *fit_args(kind, data, tmp_path / "a", max_steps=2)]) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    name = "WebDatasetDataModule" if kind == "shards" else "ImageFolderDataModule"
    assert saved[name]["batches"] == 2 and saved[name]["epoch_batches"] == 6
    saved[name] = {
        **saved[name],
        "world_size": 2,
        "epoch_batches": 3,
        "samples": 8,
    }  # as rank 0 of 2 writes it
    torch.save(saved, ckpt)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ElasticResumeWarning)
        assert lightning_main(["fit", *fit_args(kind, data, tmp_path / "b", max_steps=-1, ckpt=ckpt)]) == 0
    elastic = [str(w.message) for w in caught if issubclass(w.category, ElasticResumeWarning)]
    assert len(elastic) == 1 and "served 8 samples" in elastic[0] and "after batch 4 of 6" in elastic[0]
    rows = batch_log(tmp_path / "b" / "batches")
    assert [(r["step"], r["epoch"], r["idx"]) for r in rows[:3]] == [(2, 0, 4), (3, 0, 5), (4, 1, 0)]
    assert samples_per_epoch(rows) == {0: 4, 1: IMAGES}
    assert _final_step(tmp_path / "b") == 10


# ------------------------------------------------------------------------------------------------------------
# slow: the issue's reproducers, torchrun and python -m tadm fit

CASES = [  # kind, world before, stopped at, world after, samples left in epoch 0, final step
    ("shards", 2, 2, 1, 4, 2 + 2 + 6),  # 8 served, 4 left: 2 one-rank batches, then 6 per epoch
    (
        "shards",
        1,
        3,
        2,
        4,
        3 + 1 + 3,
    ),  # 6 served = 1.5 two-rank batches, rounded up: 1 left (2 of 12 unserved)
    ("folder", 2, 2, 1, 4, 2 + 2 + 6),
    ("folder", 1, 2, 2, 8, 2 + 2 + 3),  # 4 served = 1 two-rank batch: 2 left
]


def _tadm_fit(world: int, args: list[str], log: Path) -> None:
    """``python -m tadm fit`` on one process, ``torchrun --nproc-per-node 2 -m tadm fit`` on two."""
    if world == 1:
        command = [sys.executable, "-m", "tadm", "fit", *args]
    else:
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(world),
        ]
        command = [
            *torchrun,
            "-m",
            "tadm",
            "fit",
            *args,
            f"--trainer.devices={world}",
            "--trainer.strategy=ddp",
        ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"tadm fit on {world} process(es) hung (killed after {TIMEOUT_S} s)")
    assert proc.returncode == 0, log.read_text()[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "before", "stop", "after", "left", "final"), CASES)
def test_the_issue_reproducers_resume_on_another_world(
    kind: str, before: int, stop: int, after: int, left: int, final: int, data: Path, tmp_path: Path
) -> None:
    _tadm_fit(before, fit_args(kind, data, tmp_path / "a", max_steps=stop), tmp_path / "a.log")
    assert _final_step(tmp_path / "a") == stop
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _tadm_fit(after, fit_args(kind, data, tmp_path / "b", max_steps=-1, ckpt=ckpt), tmp_path / "b.log")
    rows = batch_log(tmp_path / "b" / "batches")
    assert samples_per_epoch(rows) == {0: left, 1: IMAGES}
    assert {r["rank"] for r in rows} == set(range(after))
    assert _final_step(tmp_path / "b") == final
    log = (tmp_path / "b.log").read_text()
    assert log.count("ElasticResumeWarning: ") == 1, log[-3000:]  # rank zero alone
    assert f"written by {before} process(es) at batch size 2 on {after} process(es)" in log
