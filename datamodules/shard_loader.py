"""The loader of a shard stream: batches for Lightning, the training position on every epoch, collation.

:class:`ShardLoader` is what :class:`~tadm.datamodules.webdataset.WebDatasetDataModule` returns from its
``*_dataloader`` hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, default_collate

from tadm.datamodules.shard_streams import ShardStream, TrainShardStream


def eval_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack whole images; images of different sizes get an error that says how to fix it."""
    try:
        return default_collate(batch)
    except RuntimeError as exc:
        sizes = sorted({tuple(s["image"].shape[-2:]) for s in batch})
        if len(sizes) > 1:
            raise ValueError(
                f"evaluation images of different sizes {sizes} cannot share a batch; set val_batch_size: 1"
            ) from exc
        raise


class ShardLoader:
    """Batches of one shard stream; a training stream learns its start (epoch, batches run) on each ``iter``.

    ``state_dict`` makes Lightning treat it as resumable: a run resumed mid-epoch goes on with the epoch's
    walk where the checkpoint stopped (the position comes from the trainer: epoch start and batches run).

    It holds a DataLoader rather than being one: Lightning warns about every DataLoader whose dataset is
    an IterableDataset with a length, because it cannot know whether the workers split the data ("could
    be inaccurate ... duplicate data"). These streams split themselves per rank and worker and know their
    exact number of batches, so they reach Lightning as a plain iterable of batches with a length, which it
    takes as is (no sampler to inject either way).
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        drop_last: bool,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        position: Callable[[], tuple[int, ...]] | None = None,
    ) -> None:
        self.stream = stream
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
        )
        self._position = position
        self._manual_epoch = 0

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        # A generator: Lightning calls iter() once just to check that this is iterable, which must not start
        # workers or move the training position; both happen when the first batch is asked for.
        stream = self.stream
        if isinstance(stream, TrainShardStream):
            if self._position is not None:
                stream.set_position(*self._position())
            else:  # used outside a Trainer: every iteration is a new epoch
                stream.set_position(self._manual_epoch, self._manual_epoch * len(self))
                self._manual_epoch += 1
            stream.log_placement()  # every rank, every epoch: what it owns and reads
        yield from self.loader

    def state_dict(self) -> dict[str, Any]:
        stream = self.stream
        if isinstance(stream, TrainShardStream):
            return {
                "epoch": stream.epoch,
                "start_batch": stream.start_batch,
                "done": stream.done,
                "seed": stream.seed,
            }
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the position comes from the trainer's restored batch counters."""
