"""Fair training placement: with the shards' counts every rank owns an equal share of the samples (within
one), every sample is read about equally often in an epoch, and each rank says what it owns (INFO log) or
warns when the shares may be unequal. Ranks are simulated in one process (``RANK`` / ``WORLD_SIZE``), and
DataLoader workers by setting the stream's worker slot."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tadm.datamodules.shard_streams as shard_streams
from tadm.datamodules.placement import (
    Piece,
    Share,
    UnevenPlacementWarning,
    apportion,
    imbalance,
    pack,
    rank_shares,
    worker_shares,
)
from tadm.datamodules.shard_streams import TrainShardStream
from tadm.datamodules.webdataset import WebDatasetDataModule
from tests.helpers.shards import all_keys, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")

STREAM_LOG = "tadm.datamodules.shard_streams"


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard sets (with index.json) of uneven counts: 7 + 4, 5 + 3 + 4 + 6, and a single shard of 7."""
    root = tmp_path_factory.mktemp("fair")
    return {
        "7,4": write_shards(root / "a", [7, 4]),
        "5,3,4,6": write_shards(root / "b", [5, 3, 4, 6]),
        "7": write_shards(root / "c", [7]),
    }


def _data_module(
    shards: Path | list[str], monkeypatch: pytest.MonkeyPatch, rank: int, world: int, **kwargs: Any
) -> WebDatasetDataModule:
    """The data module as set up on ``rank`` of ``world`` (Lightning's launchers set these variables)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    spec = str(shards) if isinstance(shards, Path) else shards
    dm = WebDatasetDataModule(train_shards=spec, crop_size=32, scale=16, shuffle_buffer=4, **kwargs)
    dm.setup("fit")
    return dm


def _train_stream(
    shards: Path | list[str], monkeypatch: pytest.MonkeyPatch, rank: int, world: int, **kwargs: Any
) -> TrainShardStream:
    """The training stream the data module builds on ``rank`` of ``world``."""
    stream = _data_module(shards, monkeypatch, rank, world, **kwargs).datasets["train"]
    assert isinstance(stream, TrainShardStream)
    return stream


def _epoch_keys(stream: TrainShardStream, workers: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of one epoch of ``stream``, from each of ``workers`` DataLoader workers in turn."""
    keys: list[str] = []
    for worker in range(workers):
        monkeypatch.setattr(shard_streams, "worker_slot", lambda w=worker: (w, workers))
        keys += [s["key"] for s in stream]
    return keys


# ------------------------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize(
    ("counts", "world"),
    [([7, 4], 2), ([5, 3, 4, 6], 2), ([5, 3, 4, 6], 3), ([7], 2), ([1], 3), ([1000] * 99 + [300], 8)],
)
def test_rank_shares_are_equal_within_one_sample_and_cover_every_sample_once(
    counts: list[int], world: int
) -> None:
    shares = rank_shares(counts, world)
    sizes = [s.size for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(counts)
    owners = Counter(
        (shard, pos)
        for s in shares
        for shard in s.shards
        for pos in range(counts[shard])
        if s.owns(shard, pos)
    )
    assert set(owners) == {(i, p) for i, c in enumerate(counts) for p in range(c)}
    assert set(owners.values()) == {1}
    # shards are kept whole where they fit: [5, 3, 4, 6] on 2 ranks is 6 + 3 and 5 + 4
    if (counts, world) == ([5, 3, 4, 6], 2):
        assert [s.pieces for s in shares] == [
            (Piece(1, 0, 3), Piece(3, 0, 6)),
            (Piece(0, 0, 5), Piece(2, 0, 4)),
        ]


def test_random_plans_give_every_rank_and_worker_its_quota_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = [int(c) for c in rng.integers(0, 20, size=int(rng.integers(1, 12)))]
        world, workers = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        targets = [int(t) for t in rng.integers(0, 5, size=workers)]
        seen: Counter[tuple[int, int]] = Counter()
        ranks = rank_shares(counts, world)
        for share in ranks:
            parts = worker_shares(share, targets)
            assert [p.size for p in parts] == apportion(share.size, targets)
            for piece in (piece for part in parts for piece in part.pieces):
                positions = range(piece.start, piece.stop)
                assert all(share.owns(piece.shard, pos) for pos in positions), "a worker owns another's"
                seen.update((piece.shard, pos) for pos in positions)
        assert sorted(seen) == [(i, p) for i, c in enumerate(counts) for p in range(c)]
        assert set(seen.values()) <= {1}
        assert max(s.size for s in ranks) - min(s.size for s in ranks) <= 1


def test_apportion_and_pack_follow_their_rules() -> None:
    assert apportion(11, [1, 1]) == [6, 5]
    assert apportion(5, [4, 2]) == [3, 2]  # worker 0 produces two batches, worker 1 one
    assert apportion(7, [0, 3, 3, 0]) == [0, 4, 3, 0]  # no samples for a worker that produces no batch
    # a shard too big for any rank is cut by position; the small one stays whole
    assert pack([Piece(0, 0, 7), Piece(1, 0, 4)], [6, 5]) == [
        Share((Piece(0, 0, 2), Piece(1, 0, 4))),
        Share((Piece(0, 2, 7),)),
    ]
    with pytest.raises(ValueError, match="11 samples cannot fill quotas adding up to 10"):
        pack([Piece(0, 0, 7), Piece(1, 0, 4)], [5, 5])
    assert imbalance([6, 5]) is None and imbalance([100, 91]) is None
    message = imbalance([7, 4])
    assert message is not None and "own 4 to 7 training samples" in message


# ------------------------------------------------------------------------------------------------------------
# one epoch of every rank


@pytest.mark.parametrize(
    ("name", "world", "samples_per_epoch", "batch_size", "workers"),
    [
        ("7,4", 2, 6, 1, 1),  # 11 photos: 6 + 5, each rank reads 6
        ("7,4", 2, 6, 2, 2),  # 3 batches: worker 0 makes 2 of them, so it owns twice the samples
        ("5,3,4,6", 2, None, 1, 2),  # default epoch: 18 x 1 // 2 = 9
        ("5,3,4,6", 3, None, 1, 1),  # 6 per rank, one shard cut
        ("5,3,4,6", 2, 9, 3, 4),  # 3 batches on 4 workers: the idle worker owns nothing
        ("7", 2, 4, 1, 2),  # a single shard on 2 ranks
    ],
)
def test_one_epoch_reads_every_sample_and_none_twice_more_than_another(
    shard_sets: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    world: int,
    samples_per_epoch: int | None,
    batch_size: int,
    workers: int,
) -> None:
    root = shard_sets[name]
    reads: Counter[str] = Counter()
    per_rank: list[set[str]] = []
    owned: list[int] = []
    for rank in range(world):
        stream = _train_stream(
            root, monkeypatch, rank, world, samples_per_epoch=samples_per_epoch, batch_size=batch_size
        )
        keys = _epoch_keys(stream, workers, monkeypatch)
        assert len(keys) == len(stream)  # every rank runs the same number of steps
        reads.update(keys)
        per_rank.append(set(keys))
        assert stream.plan.share is not None
        owned.append(stream.plan.share.size)
    assert max(owned) - min(owned) <= 1, f"ranks own {owned} samples"
    assert all(not a & b for i, a in enumerate(per_rank) for b in per_rank[i + 1 :]), "ranks share samples"
    assert set(reads) == all_keys(root), f"never read: {sorted(all_keys(root) - set(reads))}"
    assert max(reads.values()) - min(reads.values()) <= 1, f"read counts {sorted(reads.values())}"


# ------------------------------------------------------------------------------------------------------------
# visible


def test_every_rank_logs_its_share_each_epoch(
    shard_sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STREAM_LOG)
    root = shard_sets["5,3,4,6"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnevenPlacementWarning)  # balanced: no warning
        for rank, world in ((1, 2), (2, 3)):
            _train_stream(root, monkeypatch, rank, world)
    loader = _data_module(root, monkeypatch, 2, 3, batch_size=2).train_dataloader()
    for _ in range(2):  # two epochs (outside a Trainer every iteration is one)
        next(iter(loader))
    lines = [r.getMessage() for r in caplog.records if r.name == STREAM_LOG and r.levelno == logging.INFO]
    assert lines == [
        "rank 2/3, epoch 0: 6 samples from shard-000001.tar[1:3], shard-000002.tar; 6 per epoch",
        "rank 2/3, epoch 1: 6 samples from shard-000001.tar[1:3], shard-000002.tar; 6 per epoch",
    ]
    stream = _train_stream(root, monkeypatch, 1, 2, batch_size=3)
    assert (
        stream.placement()
        == "rank 1/2, epoch 0: 9 samples from shard-000000.tar, shard-000002.tar; 9 per epoch"
    )


def test_unknown_counts_keep_whole_shards_and_warn(
    shard_sets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards without index.json: today's split_by_node, with a warning that ranks may be unequal."""
    for tar in sorted(shard_sets["7,4"].glob("*.tar")):
        shutil.copy(tar, tmp_path / tar.name)
    urls = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    with pytest.warns(
        UnevenPlacementWarning,
        match=r"counts of the 2 training shard\(s\) are unknown \(no index\.json\), so each of the 2 ranks",
    ):
        stream = _train_stream(urls, monkeypatch, 1, 2, samples_per_epoch=5, batch_size=1)
    assert stream.plan.share is None
    assert stream.placement() == (
        "rank 1/2, epoch 0: an unknown number of samples (no index.json), shard-000001.tar; 5 per epoch"
    )
    assert {s["key"] for s in stream} <= {k for k in all_keys(shard_sets["7,4"]) if k.startswith("s1_")}
    with warnings.catch_warnings():  # one rank: nothing to balance
        warnings.simplefilter("error", UnevenPlacementWarning)
        TrainShardStream(urls, 32, batch_size=1, samples_per_epoch=5)
