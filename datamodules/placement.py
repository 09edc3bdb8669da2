"""Who reads what: the samples of each (rank, DataLoader worker), and the batches of each worker.

With the shards' sample counts (``index.json``) the ranks own equal shares of the samples (within one
sample), and the workers of a rank shares in proportion to the batches they produce: whole shards where
they fit, the rest cut by sample position (:func:`pack`). Equal shares mean every sample is read about
equally often, whatever the shard sizes. Without counts, shards are dealt out whole (``split_by_node``,
``split_by_worker``: :class:`Ownership`), which can leave a rank with fewer samples that it repeats more.

Either way every sample belongs to exactly one (rank, worker), whatever order the shards are read in, and a
DataLoader takes batches from its workers round-robin; the shard streams build on these facts to give every
rank the same number of batches without talking to the others.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from torch.utils.data import get_worker_info


class UnevenPlacementWarning(UserWarning):
    """Ranks own unequal shares of the training samples (or their counts are unknown)."""


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


class Reader(Protocol):
    """What a stream needs to know of a share: the shards to open, the samples to keep, where to stop."""

    @property
    def shards(self) -> tuple[int, ...]: ...

    def owns(self, shard: int, pos: int) -> bool: ...

    def end(self, shard: int) -> int | None:
        """Position from which nothing more of ``shard`` is needed (None: read it to the end)."""
        ...


# ------------------------------------------------------------------------------------------------------------
# Known counts: equal shares


@dataclass(frozen=True, order=True)
class Piece:
    """Samples ``start`` to ``stop - 1`` (tar positions) of shard number ``shard``."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Share:
    """What one rank or worker owns: non-overlapping pieces of shards, in shard order."""

    pieces: tuple[Piece, ...]

    @classmethod
    def whole(cls, counts: Sequence[int]) -> Share:
        return cls(tuple(Piece(i, 0, int(c)) for i, c in enumerate(counts) if c > 0))

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)

    @cached_property
    def _ranges(self) -> dict[int, list[tuple[int, int]]]:
        ranges: dict[int, list[tuple[int, int]]] = {}
        for p in self.pieces:
            ranges.setdefault(p.shard, []).append((p.start, p.stop))
        return ranges

    @property
    def shards(self) -> tuple[int, ...]:
        return tuple(self._ranges)

    def owns(self, shard: int, pos: int) -> bool:
        return any(start <= pos < stop for start, stop in self._ranges.get(shard, ()))

    def end(self, shard: int) -> int | None:
        return max((stop for _, stop in self._ranges.get(shard, ())), default=0)

    def describe(self, names: Sequence[str], counts: Sequence[int], limit: int = 6) -> str:
        """``shard-000002.tar, shard-000003.tar[0:4]``: whole shards by name, cut ones with their range."""
        parts = [
            names[p.shard] if p.size == counts[p.shard] else f"{names[p.shard]}[{p.start}:{p.stop}]"
            for p in self.pieces
        ]
        return shortened(parts, limit)


def shortened(parts: Sequence[str], limit: int) -> str:
    """At most ``limit`` items, then how many more: a log line for thousands of shards stays short."""
    if not parts:
        return "no shard"
    more = f", ... ({len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the lower index).

    Equal weights give the first ``total % n`` parts one more; a weight of 0 gets nothing.
    """
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    parts = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def pack(pieces: Sequence[Piece], quotas: Sequence[int]) -> list[Share]:
    """Deal ``pieces`` into bins holding exactly ``quotas`` samples each (the quotas add up to the pieces).

    Largest first, each piece goes whole to the bin with the most room (ties: the lower index) if it fits
    there; whole shards are cheapest to read. What fits nowhere is poured, in shard order, into the room
    left, bin by bin, so few pieces are cut: a cut costs the later bin a read through the earlier samples.
    """
    if sum(p.size for p in pieces) != sum(quotas):
        raise ValueError(
            f"{sum(p.size for p in pieces)} samples cannot fill quotas adding up to {sum(quotas)}"
        )
    room = list(quotas)
    bins: list[list[Piece]] = [[] for _ in quotas]
    most_room = [(-r, i) for i, r in enumerate(room)]
    heapq.heapify(most_room)
    left: list[Piece] = []
    for piece in sorted((p for p in pieces if p.size > 0), key=lambda p: (-p.size, p)):
        _, b = most_room[0]
        if piece.size <= room[b]:
            bins[b].append(piece)
            room[b] -= piece.size
            heapq.heapreplace(most_room, (-room[b], b))
        else:
            left.append(piece)
    b = 0
    for piece in sorted(left):
        start = piece.start
        while start < piece.stop:
            while room[b] == 0:
                b += 1
            take = min(room[b], piece.stop - start)
            bins[b].append(Piece(piece.shard, start, start + take))
            room[b] -= take
            start += take
    return [Share(tuple(sorted(b))) for b in bins]


def rank_shares(counts: Sequence[int], world_size: int) -> list[Share]:
    """Every rank's share of the shards (``counts`` samples each): equal sizes, within one sample."""
    whole = Share.whole(counts)
    return pack(whole.pieces, apportion(whole.size, [1] * world_size))


def worker_shares(rank_share: Share, targets: Sequence[int]) -> list[Share]:
    """A rank's share split between its workers in proportion to the samples each produces per epoch.

    Equal reads per sample: a worker that produces twice the batches owns twice the samples, and one that
    produces none owns none (its samples would never be read).
    """
    return pack(rank_share.pieces, apportion(rank_share.size, targets))


def imbalance(sizes: Sequence[int]) -> str | None:
    """What is unfair about these rank shares, or None: the largest may exceed the smallest by one or 10%."""
    lo, hi = min(sizes), max(sizes)
    if hi - lo <= max(1, hi // 10):
        return None
    return (
        f"the {len(sizes)} ranks own {lo} to {hi} training samples each, so the ranks with fewer read "
        "theirs more often in every epoch"
    )


# ------------------------------------------------------------------------------------------------------------
# One rank's plan


@dataclass(frozen=True)
class RankPlan:
    """One rank's place among the training shards: its share, its workers' shares, and what to tell the user.

    ``share`` is None when the counts are unknown: then shards are dealt out whole (:class:`Ownership`), and
    ``problem`` says so whenever there are several ranks.
    """

    rank: int
    world_size: int
    names: tuple[str, ...]
    counts: tuple[int, ...] | None
    share: Share | None
    problem: str | None

    @classmethod
    def make(cls, urls: Sequence[str], counts: Sequence[int] | None, rank: int, world_size: int) -> RankPlan:
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(counts)} counts for {len(urls)} shards")
        names = tuple(url.rstrip("/").rsplit("/", 1)[-1] for url in urls)
        if counts is not None:
            shares = rank_shares(counts, world_size)
            problem = imbalance([s.size for s in shares])
            return cls(rank, world_size, names, tuple(int(c) for c in counts), shares[rank], problem)
        problem = None
        if world_size > 1:
            problem = (
                f"the sample counts of the {len(urls)} training shard(s) are unknown (no index.json), so each "
                f"of the {world_size} ranks reads whole shards (split_by_node): ranks may own unequal numbers "
                "of samples, and the ranks with fewer read theirs more often in every epoch. Write the shards "
                "with `tadm shard` (it writes index.json) to balance the ranks by sample count"
            )
        return cls(rank, world_size, names, None, None, problem)

    def readers(self, worker: int, targets: Sequence[int]) -> tuple[Reader, Reader]:
        """What ``worker`` owns (``targets``: the samples each worker produces per epoch), and what it reads
        instead if that holds no usable sample: its rank's share, or everything if the rank owns nothing."""
        if self.share is None:
            own = Ownership.plan(len(self.names), self.rank, self.world_size, worker, len(targets))
            return own, AllOf(own.shards)
        mine = worker_shares(self.share, targets)[worker]
        return mine, self.share if self.share.size else AllOf(tuple(range(len(self.names))))

    def describe(self) -> str:
        """``9 samples from shard-000002.tar, shard-000003.tar[0:4]``."""
        if self.share is None or self.counts is None:
            own = Ownership.plan(len(self.names), self.rank, self.world_size, 0, 1)
            how = f"1 in {self.world_size} samples of " if own.rank_by_sample else ""
            shards = shortened([self.names[i] for i in own.shards], 6)
            return f"an unknown number of samples (no index.json), {how}{shards}"
        return f"{self.share.size} samples from {self.share.describe(self.names, self.counts)}"


# ------------------------------------------------------------------------------------------------------------
# Unknown counts: whole shards


@dataclass(frozen=True)
class AllOf:
    """Every sample of some shards (what a worker owning nothing borrows)."""

    shards: tuple[int, ...]

    def owns(self, shard: int, pos: int) -> bool:
        return True

    def end(self, shard: int) -> int | None:
        return None


@dataclass(frozen=True)
class Ownership:
    """Which shards one (rank, worker) reads and which of their samples are its own, counts unknown.

    Shards are split between ranks, then workers (split_by_node, split_by_worker) when there are enough of
    them; otherwise the samples of the shards are split by position. Either way every sample belongs to
    exactly one (rank, worker), whatever order the shards are read in, but the shares are as unequal as the
    shards.
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

    def end(self, shard: int) -> int | None:
        return None
