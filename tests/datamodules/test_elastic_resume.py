"""Resuming a checkpoint on a different number of processes (:mod:`tadm.datamodules.elastic`).

Fast: the accounting in pure Python (a position saved by N ranks continued by M), the image folder's epoch
sampler against torch's samplers, and a one-process resume of a checkpoint that says it was written by two
ranks (Lightning's counters really move). Slow: 2-process DDP on CPU (gloo) in a child process, 2 -> 1 and
1 -> 2 for both data modules, with the sample ids of every step recorded per rank.

The child process re-runs this file as a script (``__main__`` below) and forks its DDP ranks (``ddp_fork``):
one import of torch and Lightning for all the runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from tadm.datamodules.elastic import (
    ElasticResumeWarning,
    EpochPosition,
    EpochSampler,
    continuation,
    describe,
)
from tadm.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 400

# ------------------------------------------------------------------------------------------------------------
# the accounting, in pure Python


def _position(world: int, batches: int, epoch_batches: int, batch: int = 2) -> EpochPosition:
    return EpochPosition(world, batch, epoch=3, batches=batches, epoch_batches=epoch_batches, order_seed=7)


def test_continuation_counts_the_epoch_in_samples_of_the_whole_world() -> None:
    # 24 samples, batch 2: 6 batches per rank on 2 ranks, 12 on 1, 3 on 4
    two_to_one = continuation(_position(2, batches=2, epoch_batches=6), 1, 2, epoch_batches=12)
    assert (two_to_one.start, two_to_one.batches, two_to_one.per_rank) == (8, 4, 16)  # 8 + 16 = 24
    one_to_two = continuation(_position(1, batches=4, epoch_batches=12), 2, 2, epoch_batches=6)
    assert (one_to_two.start, one_to_two.batches, one_to_two.per_rank) == (8, 2, 8)  # 8 + 2 x 8 = 24
    # 3 batches on one rank are 1.5 batches on two: rounded up, 2 samples (< 2 ranks x batch 2) left out
    odd = continuation(_position(1, batches=3, epoch_batches=12), 2, 2, epoch_batches=6)
    assert (odd.start, odd.batches, odd.per_rank) == (6, 2, 8)
    # a smaller batch on more ranks: 16 samples served = 4 batches of 2 ranks x 2
    rebatched = continuation(_position(2, batches=2, epoch_batches=6, batch=4), 2, 2, epoch_batches=6)
    assert rebatched.batches == 4
    assert (odd.epoch, odd.order_seed) == (3, 7)


def test_continuation_keeps_the_epoch_boundaries_and_an_unchanged_world() -> None:
    for world, batches, epoch_batches in [(2, 1, 6), (2, 5, 6), (4, 2, 3)]:
        same = continuation(_position(world, batches, epoch_batches), world, 2, epoch_batches)
        assert (same.batches, same.start) == (batches, batches * 2 * world)
    finished = continuation(_position(2, batches=6, epoch_batches=6), 1, 2, epoch_batches=12)
    assert finished.batches == 12 and finished.per_rank == 0  # Lightning then starts the next epoch
    unbegun = continuation(_position(2, batches=0, epoch_batches=6), 1, 2, epoch_batches=12)
    assert (unbegun.batches, unbegun.start, unbegun.per_rank) == (0, 0, 24)
    # the last samples of the epoch fill less than a batch of the new world: one more batch, not a closed epoch
    late = continuation(_position(1, batches=11, epoch_batches=12), 2, 2, epoch_batches=6)
    assert late.batches == 5 and late.per_rank == 2


def test_continuation_in_a_changed_world_resumes_on_a_whole_accumulation() -> None:
    """Lightning steps when its count is a multiple of accumulate_grad_batches: 1.5 batches of the new world
    would become 2 (one batch short of a step of 2 accumulated batches, the first step after resuming would
    average one batch) -> 4 under accumulation over 4; an unchanged world keeps its count."""
    odd = _position(1, batches=3, epoch_batches=12)  # 6 samples = 1.5 batches of 2 ranks x 2
    assert continuation(odd, 2, 2, epoch_batches=6).batches == 2
    assert continuation(odd, 2, 2, epoch_batches=6, accumulate=2).batches == 2  # already whole
    four = continuation(odd, 2, 2, epoch_batches=6, accumulate=4)
    assert (four.start, four.batches, four.per_rank) == (6, 4, 4)  # 6 + 2 x 4 = 14 samples: 10 left out
    three = continuation(_position(3, batches=1, epoch_batches=4), 1, 2, epoch_batches=12, accumulate=2)
    assert (three.batches, three.per_rank) == (4, 16)  # 6 samples = 3 batches -> 4
    capped = continuation(_position(1, batches=9, epoch_batches=12), 2, 2, epoch_batches=6, accumulate=4)
    assert capped.batches == 5  # below the epoch's end, where Lightning steps anyway
    same = continuation(_position(2, batches=3, epoch_batches=6), 2, 2, epoch_batches=6, accumulate=2)
    assert same.batches == 3  # a checkpoint mid-accumulation (a SLURM requeue) on its own world: as saved


def test_position_round_trips_and_a_damaged_one_names_its_key() -> None:
    saved = _position(2, batches=2, epoch_batches=6)
    assert EpochPosition.from_state_dict(saved.state_dict()) == saved
    assert saved.samples == 8 and saved.mid_epoch
    assert not _position(2, batches=6, epoch_batches=6).mid_epoch
    assert EpochPosition.from_state_dict({**saved.state_dict(), "order_seed": None}).order_seed is None
    for key, value in [("world_size", 0), ("batches", -1), ("epoch", "3"), ("batch_size", True)]:
        with pytest.raises(CheckpointError, match=f"{key}="):
            EpochPosition.from_state_dict({**saved.state_dict(), key: value})
    with pytest.raises(CheckpointError, match="epoch_batches=None"):
        EpochPosition.from_state_dict({k: v for k, v in saved.state_dict().items() if k != "epoch_batches"})


def test_the_warning_names_both_world_sizes_and_the_position() -> None:
    saved = _position(2, batches=2, epoch_batches=6)
    text = describe(saved, continuation(saved, 1, 2, 12), 1, 2, 12)
    assert "written by 2 process(es) at batch size 2 on 1 process(es)" in text
    assert "Epoch 3 had served 8 samples (2 batches x 2 x 2 ranks)" in text and "batch 4 of 12" in text
    done = _position(2, batches=6, epoch_batches=6)
    assert describe(done, continuation(done, 1, 2, 12), 1, 2, 12).endswith("changes from epoch 4 on")


def _epoch_indices(sampler: EpochSampler) -> list[int]:
    return list(sampler)


@pytest.mark.parametrize("size", [12, 13])
def test_epoch_sampler_orders_as_lightning_and_torch_did(size: int) -> None:
    data = list(range(size))
    for world in (2, 3):  # under DDP: DistributedSampler(seed + epoch), which Lightning injected
        for rank in range(world):
            for epoch in (0, 4):
                ours = EpochSampler(data, rank, world, seed=5, shared=True, epoch=epoch)
                theirs = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5)
                theirs.set_epoch(epoch)
                assert _epoch_indices(ours) == list(theirs)
                assert len(ours) == len(theirs) and ours.order_seed == 5 + epoch
    torch.manual_seed(3)  # one process: RandomSampler's order, drawn from the global RNG
    expected = [list(RandomSampler(data)) for _ in range(2)]
    torch.manual_seed(3)
    ours = EpochSampler(data)
    assert [_epoch_indices(ours) for _ in range(2)] == expected


def _served_before(size: int, world: int, batch: int, batches: int, seed: int) -> tuple[list[int], int]:
    """Samples ``world`` ranks served in ``batches`` batches of an epoch, and its per-rank batch count."""
    served = []
    epoch_batches = math.ceil(size / world) // batch
    for rank in range(world):
        sampler = EpochSampler(list(range(size)), rank, world, seed=seed, shared=True)
        served += _epoch_indices(sampler)[: batches * batch]
    return served, epoch_batches


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (4, 2), (3, 4)])
def test_epoch_sampler_resumed_on_another_world_serves_no_sample_twice(before: int, after: int) -> None:
    size, batch = 48, 2
    for batches in range(1, math.ceil(size / before) // batch):
        served, epoch_batches = _served_before(size, before, batch, batches, seed=11)
        saved = EpochPosition(before, batch, 0, batches, epoch_batches, order_seed=11)
        new_epoch_batches = math.ceil(size / after) // batch
        rest = continuation(saved, after, batch, new_epoch_batches)
        left = new_epoch_batches - rest.batches  # what Lightning runs before closing the epoch
        short = size - len(served) < after * batch  # stopped within the new world's last batch
        for rank in range(after):
            # any seed and sharing: the saved order seed decides the permutation
            sampler = EpochSampler(list(range(size)), rank, after, seed=99, shared=False, resume=rest)
            mine = _epoch_indices(sampler)
            assert len(mine) >= left * batch, "Lightning would run out of batches"
            served += mine[: left * batch]
        where = f"{before} -> {after} after {batches} batches"
        duplicates = len(served) - len(set(served))
        if short:  # that batch is padded from the epoch's start, as DistributedSampler pads
            assert 0 < duplicates < after * batch, where
        else:
            assert duplicates == 0, f"{where}: a sample served twice"
        assert size - len(set(served)) < after * batch, f"{where}: {size - len(set(served))} left out"


def test_epoch_sampler_resumed_on_the_same_world_continues_the_uninterrupted_order() -> None:
    size, batch, world = 26, 2, 2  # 13 per rank: 6 batches, the 13th sample dropped
    for rank in range(world):
        whole = _epoch_indices(EpochSampler(list(range(size)), rank, world, seed=1, shared=True, epoch=2))
        saved = EpochPosition(world, batch, 2, batches=4, epoch_batches=6, order_seed=3)
        rest = continuation(saved, world, batch, 6)
        resumed = EpochSampler(list(range(size)), rank, world, seed=1, shared=True, epoch=2, resume=rest)
        assert _epoch_indices(resumed)[: 2 * batch] == whole[4 * batch : 6 * batch]
        again = _epoch_indices(resumed)  # the next epoch: no resume any more
        assert resumed.order_seed == 3 and again == whole


# ------------------------------------------------------------------------------------------------------------
# Lightning's counters, in one process


class IdRecorder(L.Callback):
    """Writes, per rank, the sample ids of every training batch with the global step, epoch and batch index."""

    def __init__(self, out: str, field: str) -> None:
        super().__init__()
        self.out, self.field = out, field
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        ids = [Path(i).name for i in batch[self.field]]
        self.steps.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "idx": idx, "ids": ids}
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "steps": self.steps}
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class TinyModule(L.LightningModule):
    """One parameter every batch touches; Adam, so the optimizer has state that must survive the resume."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class SteppingModule(TinyModule):
    """Reads ``estimated_stepping_batches`` in ``configure_optimizers`` (tadm's LR schedules do): Lightning
    then builds the training loader before it restores the checkpoint's loops."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


def _fit(
    kind: str,
    data: dict[str, Any],
    out: Path,
    devices: int,
    max_steps: int,
    ckpt: str | None = None,
    accumulate: int = 1,
    module: type[TinyModule] = TinyModule,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tadm.datamodules.image_folder import ImageFolderDataModule
    from tadm.datamodules.webdataset import WebDatasetDataModule

    os.environ.pop("MASTER_PORT", None)  # a fresh port for every DDP run
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=max_steps,
        max_epochs=100,  # with max_steps alone, estimated_stepping_batches would not build the loader
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            IdRecorder(str(out), "path" if kind == "folder" else "key"),
            ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=1, save_top_k=-1),
        ],
    )
    data_module = ImageFolderDataModule(**data) if kind == "folder" else WebDatasetDataModule(**data)
    trainer.fit(module(), datamodule=data_module, ckpt_path=ckpt)


def _steps(run: Path) -> list[dict[str, Any]]:
    """Every rank's recorded steps, with their rank, in (step, rank) order."""
    steps = []
    for path in sorted(run.glob("rank*.json")):
        record = json.loads(path.read_text())
        steps += [{**s, "rank": record["rank"]} for s in record["steps"]]
    return sorted(steps, key=lambda s: (s["step"], s["rank"]))


def _ids(steps: list[dict[str, Any]], epoch: int, before: int | None = None) -> list[str]:
    return [
        i for s in steps if s["epoch"] == epoch and (before is None or s["step"] < before) for i in s["ids"]
    ]


@pytest.mark.parametrize("module", [TinyModule, SteppingModule])
def test_a_two_rank_checkpoint_continues_its_epoch_on_one_process(
    tmp_path: Path, one_thread: None, module: type[TinyModule]
) -> None:
    """The saved position says 2 ranks: the one process moves Lightning's count to 2 x the batches and serves
    exactly the rest of the epoch's permutation (what rank 0 and rank 1 had not served), none of it twice;
    also when the training loader is built before the loops are restored (``SteppingModule``)."""
    from tests.helpers.shards import write_images

    write_images(tmp_path / "train", [(32, 32)] * 12)
    data = {"train_dir": str(tmp_path / "train"), "crop_size": 16, "batch_size": 2}
    _fit("folder", data, tmp_path / "a", devices=1, max_steps=2)
    path = tmp_path / "a" / "step=2.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["ImageFolderDataModule"]
    assert state == {"world_size": 1, "batch_size": 2, "epoch": 0, "batches": 2, "epoch_batches": 6} | {
        "order_seed": state["order_seed"],
        "samples": 4,
    }
    checkpoint["ImageFolderDataModule"] = {
        **state,
        "world_size": 2,
        "epoch_batches": 3,
    }  # as rank 0 of 2 writes it
    torch.save(checkpoint, path)
    with pytest.warns(
        ElasticResumeWarning, match=r"written by 2 process\(es\) .* on 1 process\(es\)"
    ) as caught:
        _fit("folder", data, tmp_path / "b", devices=1, max_steps=6, ckpt=str(path), module=module)
    assert len([w for w in caught if w.category is ElasticResumeWarning]) == 1
    steps = _steps(tmp_path / "b")
    assert [(s["step"], s["epoch"], s["idx"]) for s in steps] == [(2, 0, 4), (3, 0, 5), (4, 1, 0), (5, 1, 1)]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(state["order_seed"])).tolist()
    files = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert _ids(steps, 0) == [files[i] for i in order[8:]]  # samples 8-11 of the permutation
    resumed = torch.load(tmp_path / "b" / "step=6.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 6  # Adam's own count went on too


def test_a_resume_on_another_world_steps_on_whole_accumulations(tmp_path: Path, one_thread: None) -> None:
    """3 ranks x batch 2 had served 6 samples (step 1); one process accumulating 2 batches per step resumes
    at batch 4 of 6, not 3: its first step again averages 2 batches (from batch 3 it would have stepped
    after batch 3 alone). Samples 6-9 of the permutation follow; 10-11 are left out."""
    from tests.helpers.shards import write_images

    write_images(tmp_path / "train", [(32, 32)] * 12)
    data = {"train_dir": str(tmp_path / "train"), "crop_size": 16, "batch_size": 2}
    _fit("folder", data, tmp_path / "a", devices=1, max_steps=1, accumulate=2)
    path = tmp_path / "a" / "step=1.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["ImageFolderDataModule"]
    assert (state["batches"], state["epoch_batches"]) == (2, 6)
    checkpoint["ImageFolderDataModule"] = {**state, "world_size": 3, "batches": 1, "epoch_batches": 2}
    torch.save(checkpoint, path)
    with pytest.warns(ElasticResumeWarning) as caught:
        _fit("folder", data, tmp_path / "b", devices=1, max_steps=3, ckpt=str(path), accumulate=2)
    steps = _steps(tmp_path / "b")
    assert [(s["step"], s["epoch"], s["idx"]) for s in steps] == [(1, 0, 4), (1, 0, 5), (2, 1, 0), (2, 1, 1)]
    (text,) = [str(w.message) for w in caught if w.category is ElasticResumeWarning]
    assert "written by 3 process(es)" in text and "after batch 4 of 6" in text
    order = torch.randperm(12, generator=torch.Generator().manual_seed(state["order_seed"])).tolist()
    files = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert _ids(steps, 0) == [files[i] for i in order[6:10]]


# ------------------------------------------------------------------------------------------------------------
# 2-process DDP on CPU, in a child process

RUNS: dict[str, list[dict[str, Any]]] = {
    # image folder, 12 photos at batch 2: 3 batches per rank and epoch on 2 ranks, 6 on 1
    "folder": [
        {"name": "a2", "devices": 2, "max_steps": 3},
        {"name": "b1", "devices": 1, "max_steps": 10, "ckpt": "a2/step=2.ckpt"},  # 8 samples served, 4 left
        {"name": "e1", "devices": 1, "max_steps": 9, "ckpt": "a2/step=3.ckpt"},  # the end of epoch 0
        {"name": "a1", "devices": 1, "max_steps": 3},
        {"name": "b2", "devices": 2, "max_steps": 7, "ckpt": "a1/step=3.ckpt"},  # 6 served: 1.5 batches of 2
    ],
    # 12 samples in 2 shards at batch 2: the same counts
    "shards": [
        {"name": "a2", "devices": 2, "max_steps": 2},
        {"name": "b1", "devices": 1, "max_steps": 10, "ckpt": "a2/step=2.ckpt"},
        {"name": "a1", "devices": 1, "max_steps": 2},
        {"name": "b2", "devices": 2, "max_steps": 7, "ckpt": "a1/step=2.ckpt"},
    ],
}


def _main(config: dict[str, Any]) -> None:
    """Every run of RUNS, in order, logging each ElasticResumeWarning with the rank that raised it."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    torch.set_num_threads(1)
    warnings.simplefilter("always", ElasticResumeWarning)
    show = warnings.showwarning

    for kind, runs in RUNS.items():
        out = Path(config["out"]) / kind
        for run in runs:
            where = out / run["name"]

            def record(
                message: Any, category: type[Warning], *args: Any, where: Path = where, **kw: Any
            ) -> None:
                if issubclass(category, ElasticResumeWarning):
                    where.mkdir(parents=True, exist_ok=True)
                    with (where / f"warnings-{os.getpid()}.txt").open("a") as f:
                        f.write(f"{getattr(rank_zero_only, 'rank', 0)}\t{message}\n")
                show(message, category, *args, **kw)

            warnings.showwarning = record
            ckpt = str(out / run["ckpt"]) if "ckpt" in run else None
            _fit(kind, config[kind], where, run["devices"], run["max_steps"], ckpt)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.shards import write_images, write_shards

    root = tmp_path_factory.mktemp("elastic")
    write_images(root / "photos", [(32, 32)] * 12)
    shards = write_shards(root / "shards", [6, 6], size=(40, 40))
    config = {
        "out": str(root / "out"),
        "folder": {"train_dir": str(root / "photos"), "crop_size": 16, "batch_size": 2},
        "shards": {"train_shards": str(shards), "crop_size": 32, "batch_size": 2, "shuffle_buffer": 4},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, json.dumps(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the DDP runs hung (killed after {TIMEOUT_S} s)")
    assert proc.returncode == 0, output[-6000:]
    return root / "out"


def _warnings(run: Path) -> list[tuple[int, str]]:
    lines = [line for p in run.glob("warnings-*.txt") for line in p.read_text().splitlines()]
    return [(int(line.split("\t", 1)[0]), line.split("\t", 1)[1]) for line in lines]


def _check_resume(
    run: Path, first_step: int, last_step: int, before: int, after: int
) -> list[dict[str, Any]]:
    """Steps continue Lightning's count, the optimizer's too, and rank 0 alone warned once, naming N and M."""
    steps = _steps(run)
    assert sorted({s["step"] for s in steps}) == list(range(first_step, last_step + 1))
    assert all(sum(s["step"] == k for s in steps) == after for k in range(first_step, last_step + 1))
    final = torch.load(run / f"step={last_step + 1}.ckpt", weights_only=True)
    assert final["global_step"] == last_step + 1
    assert final["optimizer_states"][0]["state"][0]["step"] == last_step + 1
    (warned,) = _warnings(run)
    assert warned[0] == 0
    assert f"written by {before} process(es) at batch size 2 on {after} process(es)" in warned[1]
    return steps


def _check_epoch(steps: list[dict[str, Any]], epoch: int, everything: set[str], world: int) -> None:
    """A whole epoch: every rank runs the same batches, disjoint, together every sample once."""
    per_rank = [
        [i for s in steps if s["epoch"] == epoch and s["rank"] == r for i in s["ids"]] for r in range(world)
    ]
    assert len({len(ids) for ids in per_rank}) == 1
    served = [i for ids in per_rank for i in ids]
    assert len(served) == len(set(served)) == len(everything) and set(served) == everything


@pytest.mark.slow
def test_image_folder_from_two_processes_to_one(ddp_runs: Path) -> None:
    out = ddp_runs / "folder"
    before = _steps(out / "a2")
    everything = {p.name for p in (ddp_runs.parent / "photos").iterdir()}
    assert len(everything) == 12
    steps = _check_resume(out / "b1", first_step=2, last_step=9, before=2, after=1)
    # epoch 0 goes on after 2 x 2 ranks = 4 one-rank batches with the 4 samples not served, none twice
    assert [s["idx"] for s in steps if s["epoch"] == 0] == [4, 5]
    served = _ids(before, 0, before=2) + _ids(steps, 0)
    assert len(served) == len(set(served)) == 12 and set(served) == everything
    _check_epoch(steps, 1, everything, world=1)
    # from the end of epoch 0: epoch 1 from its start
    ended = _check_resume(out / "e1", first_step=3, last_step=8, before=2, after=1)
    assert [s["idx"] for s in ended] == list(range(6)) and {s["epoch"] for s in ended} == {1}
    _check_epoch(ended, 1, everything, world=1)
    assert "from epoch 1 on" in _warnings(out / "e1")[0][1]


@pytest.mark.slow
def test_image_folder_from_one_process_to_two(ddp_runs: Path) -> None:
    out = ddp_runs / "folder"
    before = _steps(out / "a1")
    everything = {p.name for p in (ddp_runs.parent / "photos").iterdir()}
    steps = _check_resume(out / "b2", first_step=3, last_step=6, before=1, after=2)
    # 6 samples served = 1.5 two-rank batches, rounded up: one batch per rank (index 2) with 4 new samples
    assert [(s["idx"], s["rank"]) for s in steps if s["epoch"] == 0] == [(2, 0), (2, 1)]
    served = _ids(before, 0, before=3) + _ids(steps, 0)
    assert len(served) == len(set(served)) == 10  # none twice; 2 (< 2 ranks x batch 2) left for no one
    _check_epoch(steps, 1, everything, world=2)


@pytest.mark.slow
def test_shards_from_two_processes_to_one_and_back(ddp_runs: Path) -> None:
    """Shards: the epoch still serves its 12 samples in all (the order of its rest is fresh)."""
    from tests.helpers.shards import all_keys

    out = ddp_runs / "shards"
    everything = set(_ids(_steps(out / "a2"), 0)) | set(_ids(_steps(out / "b1"), 1))
    assert len(everything) == 12 and everything <= all_keys(next(ddp_runs.parent.glob("shards/shards")))
    steps = _check_resume(out / "b1", first_step=2, last_step=9, before=2, after=1)
    assert [s["idx"] for s in steps if s["epoch"] == 0] == [4, 5]  # 8 + 4 = 12 samples in epoch 0
    _check_epoch(steps, 1, everything, world=1)
    steps = _check_resume(out / "b2", first_step=2, last_step=6, before=1, after=2)
    assert [(s["idx"], s["rank"]) for s in steps if s["epoch"] == 0] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    _check_epoch(steps, 1, everything, world=2)  # 4 + 8 = 12 in epoch 0, then whole epochs


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
