"""Resuming training where a checkpoint stopped, on the same or a different number of processes.

Lightning restores its own counters unchanged (global step, epoch, optimizer and schedulers: under DDP none
of them depends on the world size), but it counts the batches run in the current epoch *per rank*: after
``b`` batches, a checkpoint of N ranks at batch size B has served ``b x B x N`` samples of its epoch. The data
modules save that position in units free of the world size (:class:`EpochPosition`, in their
``state_dict``) and, resumed on M ranks, turn Lightning's count into M-rank batches before the epoch goes on
(:class:`ElasticResume`), so the epoch still serves its number of samples in total:

- :class:`~tadm.datamodules.image_folder.ImageFolderDataModule` continues the epoch's single permutation of
  the training set at the first sample not yet served (:class:`EpochSampler`), on any number of ranks: no
  sample of the interrupted epoch is served twice (but for the padding of :func:`continuation`'s last-batch
  case);
- :class:`~tadm.datamodules.webdataset.WebDatasetDataModule` serves the samples left in the epoch in a fresh
  order (which samples a rank's shuffle buffers had served is only known for the world that served them).

On an unchanged world both go on exactly where the checkpoint stopped, with the batches, crops included, of
the uninterrupted run (the shard streams re-read the epoch's start without decoding it).

The rest of the epoch is counted in whole batches of the new world: when ``b x N`` is not a multiple of M,
Lightning's count is rounded up and the epoch's last few samples (fewer than ``M x B``) are left out; under
gradient accumulation over ``k`` batches it is rounded up to a multiple of ``k`` (fewer than ``M x B x k``
left out), so the first optimiser step after resuming averages ``k`` batches like every other. A change of
world size or batch size is announced by an :class:`ElasticResumeWarning`, on rank zero only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sized
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from tadm.errors import CheckpointError


class ElasticResumeWarning(UserWarning):
    """A checkpoint resumes on another number of processes (or batch size): the sample order changes."""


@dataclass(frozen=True)
class EpochPosition:
    """Where training stood in its epoch when a checkpoint was written.

    ``batches`` and ``epoch_batches`` are per rank, as Lightning counts them; :attr:`samples` is the same
    position in samples of the whole world. ``order_seed`` seeds the epoch's permutation (image folders;
    None for shard streams).
    """

    world_size: int
    batch_size: int
    epoch: int
    batches: int
    epoch_batches: int
    order_seed: int | None = None

    @property
    def samples(self) -> int:
        """Samples of the epoch served by all ranks together."""
        return self.batches * self.batch_size * self.world_size

    @property
    def mid_epoch(self) -> bool:
        return 0 < self.batches < self.epoch_batches

    @classmethod
    def of(cls, trainer: L.Trainer, batch_size: int, order_seed: int | None = None) -> EpochPosition | None:
        """The trainer's position now; None before it knows the length of its epochs."""
        epoch_batches = trainer.num_training_batches
        current = _current_batches(trainer)
        if current is None or not math.isfinite(epoch_batches):
            return None
        return cls(
            world_size=int(trainer.world_size),
            batch_size=int(batch_size),
            epoch=int(trainer.current_epoch),
            batches=int(current.ready),
            epoch_batches=int(epoch_batches),
            order_seed=order_seed,
        )

    def state_dict(self) -> dict[str, int | None]:
        """The fields, plus ``samples`` for a reader of the checkpoint (derived, not read back)."""
        return {**asdict(self), "samples": self.samples}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EpochPosition:
        """Read a saved position; a damaged one is a :class:`~tadm.errors.CheckpointError` naming the key."""
        values: dict[str, Any] = {}
        for name in ("world_size", "batch_size", "epoch", "batches", "epoch_batches", "order_seed"):
            value = state.get(name)
            if name == "order_seed" and value is None:
                values[name] = None
                continue
            minimum = 1 if name in ("world_size", "batch_size") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise CheckpointError(
                    f"the data module's state in the checkpoint has {name}={value!r}, expected an integer >= "
                    f"{minimum}: the file was not written by a tadm data module, or it was edited"
                )
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class Continuation:
    """How an epoch interrupted by a checkpoint goes on in this world.

    ``batches`` is Lightning's count of batches run in the epoch, in this world's per-rank batches;
    ``start`` the samples of the epoch's order already served (all ranks); ``per_rank`` the samples each rank
    must still serve for Lightning to finish the epoch.
    """

    epoch: int
    start: int
    batches: int
    per_rank: int
    order_seed: int | None


def continuation(
    saved: EpochPosition, world_size: int, batch_size: int, epoch_batches: int, accumulate: int = 1
) -> Continuation:
    """Where the saved epoch goes on with ``world_size`` ranks of ``batch_size`` and ``epoch_batches`` per epoch.

    Mid-epoch, Lightning's count becomes the M-rank batches the served samples fill, rounded up (the epoch
    then leaves out fewer than ``world_size x batch_size`` of its samples); under gradient accumulation over
    ``accumulate`` batches, in a changed world it is rounded up to a whole accumulation (Lightning steps when
    its count is a multiple of ``accumulate``: otherwise the first step after resuming would average fewer
    batches than every other; the epoch then leaves out fewer than ``world_size x batch_size x accumulate``
    samples). It stays below the epoch's end:
    Lightning closes an epoch with its end-of-epoch hooks only after running its last batch, so a checkpoint
    inside the new world's last batch runs that batch, padded from the epoch's start as
    ``DistributedSampler`` pads (fewer than ``world_size x batch_size`` samples served twice). A finished
    epoch stays finished; an epoch not begun stays at its start. Unchanged world and batch sizes give back
    the saved count.
    """
    if saved.mid_epoch:
        batches = -(-saved.samples // (world_size * batch_size))
        if (saved.world_size, saved.batch_size) != (world_size, batch_size):
            batches = -(-batches // accumulate) * accumulate
        batches = max(0, min(batches, epoch_batches - 1))
        start = saved.samples
    elif saved.batches > 0:
        batches, start = epoch_batches, saved.samples
    else:
        batches, start = 0, 0
    per_rank = max(0, epoch_batches - batches) * batch_size
    return Continuation(saved.epoch, start, batches, per_rank, saved.order_seed)


def describe(
    saved: EpochPosition, rest: Continuation, world_size: int, batch_size: int, epoch_batches: int
) -> str:
    """The warning's text: both world sizes (and batch sizes) and where the epoch resumes."""
    before = f"{saved.world_size} process(es) at batch size {saved.batch_size}"
    now = f"{world_size} process(es) at batch size {batch_size}"
    text = f"resuming a checkpoint written by {before} on {now}: the order of the training samples changes"
    if not saved.mid_epoch:
        return f"{text} from epoch {saved.epoch + (saved.batches > 0)} on"
    return (
        f"{text}. Epoch {saved.epoch} had served {saved.samples} samples ({saved.batches} batches x "
        f"{saved.batch_size} x {saved.world_size} ranks) and goes on after batch {rest.batches} of "
        f"{epoch_batches} per rank"
    )


class ElasticResume:
    """The epoch position a data module writes into checkpoints and applies, converted, on resume.

    The data module's ``state_dict`` returns :meth:`state_dict`, its ``load_state_dict`` calls
    :meth:`load_state_dict`, and its ``train_dataloader`` calls :meth:`resume`. Lightning restores its loops
    after the data module, and asks for the training loader after that, or before: a ``configure_optimizers``
    that reads ``trainer.estimated_stepping_batches`` (tadm's LR schedules do) has the loader built while the
    checkpoint's loop state is still pending (and never again); the trainer's position is then read from,
    and moved in, that pending state (:func:`pending_fit_loop`).
    """

    def __init__(self) -> None:
        self.saved: EpochPosition | None = None

    def state_dict(
        self, trainer: L.Trainer | None, batch_size: int, order_seed: int | None = None
    ) -> dict[str, Any]:
        position = EpochPosition.of(trainer, batch_size, order_seed) if trainer is not None else None
        return {} if position is None else position.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saved = EpochPosition.from_state_dict(state) if state else None

    def resume(
        self, trainer: L.Trainer | None, batch_size: int, epoch_batches: int, note: str = ""
    ) -> Continuation | None:
        """Apply a loaded position once: move Lightning's batch count into this world's units, warn (rank
        zero) when the world or batch size changed, and say where the epoch's order continues (None when
        nothing is left of a loaded epoch, or nothing was loaded)."""
        saved, self.saved = self.saved, None
        if saved is None or trainer is None:
            return None
        world = int(trainer.world_size)
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        rest = continuation(saved, world, batch_size, epoch_batches, accumulate)
        same_epoch = current_epoch(trainer) == saved.epoch
        if (saved.world_size, saved.batch_size) != (world, batch_size):
            if same_epoch:
                set_epoch_batches(trainer, rest.batches)
            text = describe(saved, rest, world, batch_size, epoch_batches)
            if note and saved.mid_epoch:
                text = f"{text}; {note}"
            rank_zero_warn(f"{text}.", category=ElasticResumeWarning)
        return rest if saved.mid_epoch and same_epoch else None


def pending_fit_loop(trainer: L.Trainer) -> dict[str, Any] | None:
    """The fit loop's state of a checkpoint Lightning has loaded but not yet restored into its loops, or None.

    Lightning holds the checkpoint (``_checkpoint_connector._loaded_checkpoint``) from the restore of the
    modules until the loops are restored; a training loader built in between (``estimated_stepping_batches``)
    finds the trainer at step 0 of epoch 0, and the checkpoint's position here.
    """
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
    loops = loaded.get("loops") if isinstance(loaded, dict) else None
    fit = loops.get("fit_loop") if isinstance(loops, dict) else None
    return fit if isinstance(fit, dict) and "epoch_loop.batch_progress" in fit else None


def current_epoch(trainer: L.Trainer) -> int:
    """The trainer's epoch, or the pending checkpoint's (:func:`pending_fit_loop`), as it will have it."""
    pending = pending_fit_loop(trainer)
    if pending is not None:
        return int(pending["epoch_progress"]["current"]["completed"])
    return int(trainer.current_epoch)


def _current_batches(trainer: L.Trainer) -> Any:
    """Lightning's per-epoch batch counters (``ready``, ``started``, ``processed``, ``completed``), or None."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    current = getattr(getattr(loop, "batch_progress", None), "current", None)
    fields = ("ready", "started", "processed", "completed")
    return current if current is not None and all(hasattr(current, f) for f in fields) else None


def set_epoch_batches(trainer: L.Trainer, batches: int) -> None:
    """Shift Lightning's counts of batches run in this epoch so that ``ready`` is ``batches``.

    All four counters move together, so Lightning's restart logic (which compares them) reads the checkpoint
    as it was written; the cumulative counters, the global step and the epoch are left alone. Before Lightning
    restores its loops, the counters of the pending checkpoint move (:func:`pending_fit_loop`).
    """
    pending = pending_fit_loop(trainer)
    if pending is not None:
        counts = pending["epoch_loop.batch_progress"]["current"]
        shift = batches - int(counts["ready"])
        for name in ("ready", "started", "processed", "completed"):
            counts[name] = max(0, int(counts[name]) + shift)
        return
    current = _current_batches(trainer)
    if current is None:
        raise RuntimeError(
            "this Lightning version keeps no per-epoch batch counters where tadm expects them "
            "(trainer.fit_loop.epoch_loop.batch_progress.current): cannot resume on another world size"
        )
    shift = batches - int(current.ready)
    for name in ("ready", "started", "processed", "completed"):
        setattr(current, name, max(0, int(getattr(current, name)) + shift))


def limit_batches(length: int, limit: int | float) -> int:
    """Batches per epoch under ``Trainer(limit_train_batches=limit)``, as Lightning computes them."""
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * limit)


# ------------------------------------------------------------------------------------------------------------
# The image folder's order


class EpochSampler(DistributedSampler):
    """This rank's share of each epoch's permutation of the training set; resumable at any sample, on any
    number of ranks.

    Every epoch is one permutation of the whole set, and rank r of M serves its r-th of every M samples (the
    last ones padded from the permutation's start, as ``DistributedSampler`` pads). With ``shared`` the
    permutation is seeded with ``seed + epoch``, exactly Lightning's ``DistributedSampler`` (what the image
    folder uses, on any number of processes: every epoch's order is known from its number, so a resumed run
    serves the orders of the uninterrupted one); without, its seed is drawn from torch's global RNG when the
    epoch starts, exactly as ``RandomSampler`` does. Either way the seed is kept (:attr:`order_seed`) for the
    checkpoint, so the permutation can be continued at any sample, by any number of ranks.

    With ``tag_samples`` every index is a :class:`SampleIndex` that carries the epoch's order seed, so the
    dataset can draw the sample's augmentation from a generator of its own (:func:`sample_generator`):
    the same crop for the same sample of the same epoch, whatever ran before it (a resume, other workers).

    Lightning calls :meth:`set_epoch` and, this being a ``DistributedSampler``, adds no sampler of its own.
    """

    def __init__(
        self,
        dataset: Sized,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shared: bool = False,
        epoch: int = 0,
        resume: Continuation | None = None,
        tag_samples: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.shared = shared
        self.tag_samples = tag_samples
        self.epoch = epoch
        self.order_seed: int | None = None
        """Seed of the permutation of the epoch being served (None before the first one starts)."""
        self._resume = resume

    def _draw_seed(self) -> int:
        if self.shared:
            return self.seed + self.epoch
        return int(torch.empty((), dtype=torch.int64).random_().item())

    def __iter__(self) -> Iterator[int]:
        # a generator, like RandomSampler's: the seed is drawn when the first index is asked for
        resume, self._resume = self._resume, None
        seed = (
            resume.order_seed if resume is not None and resume.order_seed is not None else self._draw_seed()
        )
        self.order_seed = seed
        size = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        start = min(resume.start, size) if resume is not None else 0
        per_rank = math.ceil((size - start) / self.num_replicas)
        if resume is not None:  # at least what Lightning will ask for before the epoch ends
            per_rank = max(per_rank, resume.per_rank)
        total = per_rank * self.num_replicas
        rest = order[start:]
        if len(rest) < total:  # padded from the epoch's start, as DistributedSampler pads
            rest += (order * math.ceil((total - len(rest)) / max(size, 1)))[: total - len(rest)]
        mine = rest[self.rank : total : self.num_replicas]
        if self.tag_samples:
            yield from (SampleIndex(i, seed) for i in mine)
        else:
            yield from mine


class SampleIndex(int):
    """A dataset index that carries the order seed of its epoch (an ``int`` to everything else; pickles into
    DataLoader workers with its seed)."""

    order_seed: int

    def __new__(cls, index: int, order_seed: int) -> SampleIndex:
        self = super().__new__(cls, index)
        self.order_seed = int(order_seed)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return SampleIndex, (int(self), self.order_seed)


def sample_generator(index: int) -> torch.Generator | None:
    """The generator of one sample's augmentation: seeded by its epoch's order seed and its index (a
    :class:`SampleIndex`); None for a plain index (torch's global RNG then, as before)."""
    order_seed = getattr(index, "order_seed", None)
    if order_seed is None:
        return None
    mixed = np.random.SeedSequence([order_seed % 2**64, int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 ^ int(mixed[1]))


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning counts as resumable (it has ``state_dict``), so a mid-epoch checkpoint is
    not met with Lightning's "not resumable" warning: the position itself is the data module's state,
    restored before the loader is built (:class:`ElasticResume`)."""

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if isinstance(sampler, EpochSampler):
            return {"epoch": int(sampler.epoch), "order_seed": sampler.order_seed}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the data module's state holds the position."""
