"""Shard streams: the training and evaluation datasets over WebDataset shards, and their loader.

Nothing here talks to other ranks: each stream is told its rank and world size and reads only its share.
Two rules keep DDP from hanging:

- Training is an endless walk over this rank's share of the samples, reshuffled on every pass and cut into
  epochs of a fixed number of samples per rank, so every rank runs the same number of steps whatever the
  shard sizes. Ranks read disjoint samples; with the shards' counts their shares are equal (within one
  sample, :mod:`tadm.datamodules.placement`), so every sample is read about as often as any other.
- Evaluation splits the *samples* into one contiguous range per rank and pads the short ranks by wrapping
  around to the first samples (as ``DistributedSampler`` does), so every rank runs the same number of
  batches; a damaged sample is replaced by a copy of a good one rather than dropped.

Every random choice is drawn from a generator seeded with (seed, epoch start, rank, worker), where the
epoch start is the number of training batches run before the epoch began; each sample's crops and flips
from one of its own (those seeds plus the sample's place in the walk). A run resumed mid-epoch on the same
world re-reads the epoch's start without decoding it (:meth:`TrainShardStream.set_position`) and serves
the very batches of the uninterrupted run. Bad samples follow the shared policy of
:mod:`tadm.datamodules.bad_input` (warned about, counted, never a crash).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from tadm.datamodules.bad_input import (
    DEFAULT_POLICY,
    BadInputPolicy,
    InputSkippedWarning,
    SkipCounter,
    check_policy,
)
from tadm.datamodules.image_io import ImageReadError, decode_image
from tadm.datamodules.placement import RankPlan, Reader, UnevenPlacementWarning, worker_batches, worker_slot
from tadm.datamodules.shard_crops import LazyCrop, Pixels, Skipping, shuffled
from tadm.datamodules.shards import LATENT_FIELD, SampleError, image_field, iter_shard, sample_meta

#: what decoding a damaged sample can raise: such a sample is skipped and counted, never a crash
_SAMPLE_ERRORS = (ImageReadError, SampleError, ValueError, TypeError, KeyError, IndexError, OSError, EOFError)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class LatentSpec:
    """The cached latents a training stream serves: their per-crop shape and whether flips were stored."""

    shape: tuple[int, int, int]
    flips: bool


class ShardStream(IterableDataset):
    """Shared plumbing: shard list, placement in the world, skip counting."""

    split: str = "train"

    def __init__(
        self,
        urls: Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("a shard stream needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.urls = list(urls)
        self.rank = rank
        self.world_size = world_size
        self.on_bad_image: BadInputPolicy = check_policy(on_bad_image)
        self._skips = SkipCounter(f"{self.split}/w0", self.on_bad_image)

    @property
    def num_skipped(self) -> int:
        """Samples this process's current iteration left out (DataLoader workers count their own)."""
        return self._skips.count

    def _tag(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self._skips.tag(sample)

    def _shard_problem(self, message: str) -> None:
        """``iter_shard``'s callback for shard-level problems (unopenable or damaged shards)."""
        self._skips.skip(SampleError(message), "shard data")


class TrainShardStream(ShardStream):
    """Endless, reshuffled random crops from this rank's share, cut to ``samples_per_epoch`` per epoch.

    With ``counts`` the ranks own equal shares of the samples and the workers shares in proportion to their
    batches (:class:`~tadm.datamodules.placement.RankPlan`), so every sample is read about equally often.
    Without, shards are dealt out whole and the shares are as unequal as the shards (a warning says so).

    Args:
        urls: Shard URLs (already expanded).
        crop_size: Side of the square crops.
        batch_size: The loader's batch size: the epoch is ``samples_per_epoch // batch_size`` whole batches,
            dealt to DataLoader workers round-robin.
        samples_per_epoch: Samples per epoch on this rank.
        rank: This process's rank.
        world_size: Number of ranks.
        crops_per_image: Crops cut from each decoded image (decoding dominates for big photos).
        flip: Random horizontal flips (with cached latents only if flipped latents were stored).
        shuffle_buffer: Encoded samples held for shuffling (memory: this times the mean file size, per worker).
        seed: Base seed; the stream's generators are seeded with (seed, start batch, rank, worker).
        latent: Serve the cached latents of the stored crops instead of random crops.
        on_bad_image: ``"skip"`` (warn and count) or ``"error"`` (:mod:`tadm.datamodules.bad_input`).
        counts: Samples per shard (from ``index.json``); None: unknown, whole shards per rank (``plan``).
    """

    split = "train"

    def __init__(
        self,
        urls: Sequence[str],
        crop_size: int,
        batch_size: int,
        samples_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        crops_per_image: int = 1,
        flip: bool = True,
        shuffle_buffer: int = 64,
        seed: int = 0,
        latent: LatentSpec | None = None,
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
        counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__(urls, rank, world_size, on_bad_image)
        if samples_per_epoch < batch_size:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} is less than one batch ({batch_size})")
        self.plan = RankPlan.make(self.urls, counts, rank, world_size)
        if self.plan.problem is not None:
            warnings.warn(self.plan.problem, UnevenPlacementWarning, stacklevel=2)
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.crops_per_image = crops_per_image
        self.flip = flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.latent = latent
        self.epoch = 0
        self.start_batch = 0
        self.done = 0

    def set_position(self, epoch: int, start_batch: int, done: int = 0) -> None:
        """Seed the next iteration: its epoch, the training batches run before the epoch (which seed it),
        and the batches of the epoch already run (``done``: skipped, so it goes on where a checkpoint
        stopped).

        ``start_batch`` is ``epoch * len(loader)`` at an epoch's start. A resume on the same world passes
        that start and ``done``: the walk is the uninterrupted one, its first ``done`` batches passed over
        without decoding (read from the shards, not decoded; exact unless one of them was a damaged sample).
        A start of its own (a resume on another world) draws a fresh walk instead. The epoch is informational
        (when Lightning restores an end-of-epoch checkpoint it builds the iterator before advancing its
        epoch counter).
        """
        self.epoch, self.start_batch, self.done = int(epoch), int(start_batch), max(0, int(done))

    @property
    def num_batches(self) -> int:
        return self.samples_per_epoch // self.batch_size

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def placement(self) -> str:
        """This rank's share in a line: ``rank 1/2, epoch 0: 9 samples from shard-000002.tar, ...``."""
        where = f"rank {self.rank}/{self.world_size}, epoch {self.epoch}"
        return f"{where}: {self.plan.describe()}; {len(self)} per epoch"

    def log_placement(self) -> None:
        """Log :meth:`placement` at INFO (the loader does, on every rank and epoch)."""
        log.info(self.placement())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        done = min(self.done, self.num_batches)
        # A DataLoader takes batch k from worker k mod W: resumed after `done` batches, worker w serves what
        # worker (done + w) mod W of the uninterrupted epoch served from then on (its batches >= done).
        origin = (worker + done) % num_workers
        batches = worker_batches(self.num_batches, origin, num_workers)
        skip = sum(b < done for b in batches) * self.batch_size
        target = len(batches) * self.batch_size - skip
        resumed = f"+{done}" if done else ""
        self._skips = SkipCounter(f"train/b{self.start_batch}{resumed}/w{worker}", self.on_bad_image)
        if target == 0:
            return
        key = [self.seed, self.start_batch, self.rank, origin]
        seq = np.random.SeedSequence(key)
        order_rng, shuffle_rng, _ = (np.random.default_rng(s) for s in seq.spawn(3))
        targets = [len(worker_batches(self.num_batches, w, num_workers)) for w in range(num_workers)]
        reader, fallback = self.plan.readers(origin, targets)
        stream = self._passes(reader, fallback, origin, order_rng, shuffle_rng, key, skip)
        for sample in itertools.islice(stream, target):
            yield self._tag(sample)

    def _passes(
        self,
        reader: Reader,
        fallback: Reader,
        worker: int,
        order_rng: np.random.Generator,
        shuffle_rng: np.random.Generator,
        key: list[int],
        skip: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Pass after pass over this worker's shards, each in a new order through the shuffle buffer(s).

        The buffers drain at the end of each pass, so an epoch as long as the worker's share of the data sees
        every sample (crop) exactly once. The n-th image of the walk is cropped by a generator seeded with
        ``key + [n]``; the first ``skip`` crops are passed over undecoded (:class:`Skipping`).
        """
        borrowing = False
        walked = itertools.count()
        skipping = Skipping(skip)
        while True:
            stats = {"read": 0, "owned": 0, "good": 0}
            order = [reader.shards[i] for i in order_rng.permutation(len(reader.shards))]
            raw = self._owned_samples(order, reader, stats)
            decoded = (
                s
                for item in shuffled(raw, self.shuffle_buffer, shuffle_rng)
                for s in self._crops(item, [*key, next(walked)], skipping)
            )
            if self.crops_per_image > 1:  # spread the crops of one image over several batches
                decoded = shuffled(decoded, 8 * self.crops_per_image, shuffle_rng)
            for sample in decoded:
                if isinstance(sample, LazyCrop):
                    if skipping.take():
                        stats["good"] += 1
                        continue
                    made = self._decode(sample.item, np.random.default_rng(sample.seed))
                    if len(made) <= sample.k:
                        continue  # a damaged sample, counted by _decode
                    sample = made[sample.k]
                stats["good"] += 1
                yield sample
            if stats["good"]:
                continue
            shards = ", ".join(f"'{self.urls[i]}'" for i in reader.shards[:3])
            if stats["owned"]:
                raise RuntimeError(
                    f"none of the {stats['owned']} samples of shard(s) {shards} ... could be used"
                )
            if borrowing or (not stats["read"] and reader.shards):
                raise RuntimeError(f"no readable sample in shard(s) {shards} ... (see the warnings above)")
            # fewer samples than (rank, worker) slots: better repeat another slot's data than stall DDP
            warnings.warn(
                f"rank {self.rank} worker {worker} owns no sample of {len(self.urls)} shard(s); it reads "
                "samples of other workers instead. Use more (smaller) shards or fewer num_workers.",
                InputSkippedWarning,
                stacklevel=2,
            )
            reader, borrowing = fallback, True

    def _owned_samples(
        self, order: list[int], reader: Reader, stats: dict[str, int]
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        for shard in order:
            url = self.urls[shard]
            end = reader.end(shard)
            for pos, key, fields in iter_shard(url, self._shard_problem):
                if end is not None and pos >= end:
                    break  # the rest of the shard belongs to others
                stats["read"] += 1
                if reader.owns(shard, pos):
                    stats["owned"] += 1
                    yield url, key, fields

    def _crops(
        self, item: tuple[str, str, dict[str, bytes]], seed: list[int], skipping: Skipping
    ) -> list[Any]:
        """The image's crops, decoded; while the walk is still being skipped, stand-ins that decode only if
        the shuffle buffer serves them after the skipped part."""
        if skipping.left:
            return [LazyCrop(item, seed, k) for k in range(self.crops_per_image)]
        return self._decode(item, np.random.default_rng(seed))

    def _decode(
        self, item: tuple[str, str, dict[str, bytes]], rng: np.random.Generator
    ) -> list[dict[str, Any]]:
        url, key, fields = item
        try:
            data, name = image_field(fields, url, key)
            meta = sample_meta(fields, url, key)
            pixels = Pixels(data, name, self.crop_size)
            path = str(meta.get("path", key))
            if self.latent is not None:
                return self._latent_crops(pixels, fields, meta, url, key, path, rng)
            h, w = pixels.size
            out = []
            for _ in range(self.crops_per_image):
                top = int(rng.integers(0, h - self.crop_size + 1))
                left = int(rng.integers(0, w - self.crop_size + 1))
                crop = pixels.crop(top, left, self.crop_size)
                if self.flip and rng.random() < 0.5:
                    crop = crop.flip(-1)
                out.append({"image": crop, "key": key, "path": path})
            return out
        except _SAMPLE_ERRORS as exc:
            self._skips.skip(exc, f"sample '{key}' of '{url}'")
            return []

    def _latent_crops(
        self,
        pixels: Pixels,
        fields: dict[str, bytes],
        meta: dict[str, Any],
        url: str,
        key: str,
        path: str,
        rng: np.random.Generator,
    ) -> list[dict[str, Any]]:
        assert self.latent is not None
        if LATENT_FIELD not in fields:
            raise SampleError(f"sample '{key}' in '{url}' has no cached latents ({LATENT_FIELD})")
        try:
            latents = np.load(io.BytesIO(fields[LATENT_FIELD]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SampleError(f"sample '{key}' in '{url}' has unreadable latents: {exc}") from exc
        info = meta.get("latents") or {}
        boxes = info.get("boxes")
        want_flips = 2 if self.latent.flips else 1
        if (
            latents.ndim != 5
            or latents.dtype != np.float16
            or tuple(latents.shape[2:]) != self.latent.shape
            or latents.shape[1] < want_flips
            or not isinstance(boxes, list)
            or len(boxes) != latents.shape[0]
            or int(info.get("crop", -1)) != self.crop_size
        ):
            raise SampleError(
                f"sample '{key}' in '{url}': cached latents {latents.dtype}{tuple(latents.shape)} with "
                f"{len(boxes) if isinstance(boxes, list) else 'no'} crop boxes do not match crops of "
                f"{self.crop_size} and latents (K, {want_flips}, {', '.join(map(str, self.latent.shape))}) float16"
            )
        chosen = rng.choice(len(boxes), size=min(self.crops_per_image, len(boxes)), replace=False)
        out = []
        for k in chosen:
            top, left = (int(v) for v in boxes[k][:2])
            crop = pixels.crop(top, left, self.crop_size)
            flipped = self.latent.flips and self.flip and rng.random() < 0.5
            if flipped:
                crop = crop.flip(-1)
            latent = torch.from_numpy(np.ascontiguousarray(latents[k, int(flipped)]))
            out.append({"image": crop, "latent": latent, "key": key, "path": path})
        return out


class EvalShardStream(ShardStream):
    """Whole images, each rank an equal share: contiguous ranges of samples, the short ranks padded.

    Rank ``r`` serves samples ``r*P ... r*P + P - 1`` (modulo the total) with ``P = ceil(total / world)``,
    so every rank yields exactly ``P`` samples in ``ceil(P / batch_size)`` batches and reads only the
    shards of its range. A sample that cannot be decoded is replaced by a copy of a good one (warned and
    counted), so the counts hold even on damaged data.

    Args:
        urls: Shard URLs (already expanded).
        counts: Samples per shard (from ``index.json`` or a counting pass).
        batch_size: The loader's batch size (workers produce whole batches round-robin).
        split: Name used in messages and counters (``val``, ``test``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "val",
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
    ) -> None:
        self.split = split
        super().__init__(urls, rank, world_size, on_bad_image)
        if len(counts) != len(self.urls):
            raise ValueError(f"{len(counts)} counts for {len(self.urls)} shards")
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        if self.total == 0:
            raise ValueError(f"the {split} shards hold no samples: {self.urls[:3]}")
        self.batch_size = batch_size
        self.per_rank = math.ceil(self.total / world_size)
        self.offsets = list(itertools.accumulate([0, *self.counts[:-1]]))

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Global sample indices ``worker`` of this rank serves, in order."""
        b = self.batch_size
        out = []
        for j in worker_batches(math.ceil(self.per_rank / b), worker, num_workers):
            for p in range(j * b, min((j + 1) * b, self.per_rank)):
                out.append((self.rank * self.per_rank + p) % self.total)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        self._skips = SkipCounter(f"{self.split}/w{worker}", self.on_bad_image)
        wanted = self.indices(worker, num_workers)
        if not wanted:
            return
        by_shard: dict[int, set[int]] = {}
        for g in wanted:
            shard = int(np.searchsorted(self.offsets, g, side="right")) - 1
            by_shard.setdefault(shard, set()).add(g - self.offsets[shard])
        last_good: dict[str, Any] | None = None
        owed = 0
        for shard in sorted(by_shard):
            url, positions = self.urls[shard], by_shard[shard]
            last = max(positions)
            seen: set[int] = set()
            for pos, key, fields in iter_shard(url, self._shard_problem):
                if pos > last:
                    break
                if pos not in positions:
                    continue
                seen.add(pos)
                sample = self._decode(url, key, fields)
                if sample is None:
                    owed += 1
                    continue
                last_good = sample
                yield self._tag(sample)
                for _ in range(owed):
                    yield self._tag(dict(sample))
                owed = 0
            for pos in sorted(positions - seen):
                self._skips.skip(
                    SampleError("the shard ended before it (index.json says it exists)"),
                    f"sample {pos} of '{url}'",
                )
                owed += 1
        if owed:
            if last_good is None:
                last_good = self._any_good_sample()
            for _ in range(owed):
                yield self._tag(dict(last_good))

    def _decode(self, url: str, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        try:
            data, name = image_field(fields, url, key)
            meta = sample_meta(fields, url, key)
            return {"image": decode_image(data, name), "key": key, "path": str(meta.get("path", key))}
        except _SAMPLE_ERRORS as exc:
            self._skips.skip(exc, f"sample '{key}' of '{url}'")
            return None

    def _any_good_sample(self) -> dict[str, Any]:
        """A stand-in for a worker whose samples all failed: the first good one of the whole split.

        A look-ahead: the problems it meets were (or will be) warned about and counted by their owner.
        """
        saved, self._skips = self._skips, SkipCounter(self._skips.source, "skip", quiet=True)
        try:
            for url in self.urls:
                for _, key, fields in iter_shard(url, lambda _problem: None):
                    sample = self._decode(url, key, fields)
                    if sample is not None:
                        return sample
        finally:
            self._skips = saved
        raise RuntimeError(
            f"no readable image in any of the {len(self.urls)} {self.split} shard(s): {self.urls[:3]}"
        )
