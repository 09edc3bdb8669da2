"""Who reads what: the shards and samples of each (rank, DataLoader worker), and the batches of each worker.

Every sample belongs to exactly one (rank, worker), whatever order the shards are read in, and a
DataLoader takes batches from its workers round-robin; the shard streams build on these two facts to
give every rank the same number of batches without talking to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import get_worker_info


def split_by_node(items: Sequence[int], rank: int, world_size: int) -> list[int]:
    """WebDataset's ``split_by_node`` with an explicit rank: every ``world_size``-th item from ``rank``."""
    return list(items[rank::world_size])


def split_by_worker(items: Sequence[int], worker: int, num_workers: int) -> list[int]:
    """WebDataset's ``split_by_worker`` with an explicit worker id."""
    return list(items[worker::num_workers])


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_batches(num_batches: int, worker: int, num_workers: int) -> list[int]:
    """Batches ``worker`` produces: a DataLoader takes batches from its workers round-robin."""
    return list(range(worker, num_batches, num_workers))


@dataclass(frozen=True)
class Ownership:
    """Which shards one (rank, worker) reads and which of their samples are its own.

    Shards are split between ranks, then workers (split_by_node, split_by_worker) when there are enough of
    them; otherwise the samples of the shards are split by position. Either way every sample belongs to
    exactly one (rank, worker), whatever order the shards are read in.
    """

    shards: tuple[int, ...]
    rank: int
    world_size: int
    worker: int
    num_workers: int
    rank_by_sample: bool
    worker_by_sample: bool

    @classmethod
    def plan(cls, num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> Ownership:
        everything = list(range(num_shards))
        rank_by_sample = num_shards < world_size
        rank_shards = everything if rank_by_sample else split_by_node(everything, rank, world_size)
        worker_by_sample = len(rank_shards) < num_workers
        shards = rank_shards if worker_by_sample else split_by_worker(rank_shards, worker, num_workers)
        return cls(tuple(shards), rank, world_size, worker, num_workers, rank_by_sample, worker_by_sample)

    def owns(self, shard: int, pos: int) -> bool:
        if self.rank_by_sample:
            k = shard + pos
            if k % self.world_size != self.rank:
                return False
            return not self.worker_by_sample or (k // self.world_size) % self.num_workers == self.worker
        if self.worker_by_sample:
            return (shard // self.world_size + pos) % self.num_workers == self.worker
        return True
