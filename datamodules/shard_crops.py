"""What a training shard stream does to its images: decode and cut crops (:class:`Pixels`), shuffle
(:func:`shuffled`), and pass over the start of a resumed epoch without decoding it (:class:`Skipping`,
:class:`LazyCrop`). Used by :mod:`tadm.datamodules.shard_streams`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tadm.datamodules.image_io import decode_image, decode_uint8, uint8_to_unit
from tadm.datamodules.image_transforms import reflect_pad
from tadm.datamodules.shards import SampleError

# ------------------------------------------------------------------------------------------------------------
# Decoding


class Pixels:
    """One decoded image, mirror-padded to at least the crop size, cut into float crops on demand."""

    def __init__(self, data: bytes, name: str, min_size: int) -> None:
        u8 = decode_uint8(data, name)
        self.is_uint8 = u8 is not None
        image = u8 if u8 is not None else decode_image(data, name)
        self.tensor = reflect_pad(image, min_size, min_size)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])

    def crop(self, top: int, left: int, size: int) -> torch.Tensor:
        h, w = self.size
        if top < 0 or left < 0 or top + size > h or left + size > w:
            raise SampleError(f"crop box ({top}, {left}, {size}) lies outside the {h}x{w} (padded) image")
        patch = self.tensor[:, top : top + size, left : left + size]
        # a copy, never a view: a view would keep the whole decoded photo alive in the shuffle buffers
        return uint8_to_unit(patch) if self.is_uint8 else patch.clone()


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of ``size`` items (WebDataset's), drained in random order when the input ends."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


@dataclass(frozen=True)
class LazyCrop:
    """Crop ``k`` of an image met while skipping the start of a resumed epoch, decoded only if served."""

    item: tuple[str, str, dict[str, bytes]]
    seed: list[int]
    k: int


class Skipping:
    """How many crops of a resumed walk are still to be passed over (the epoch's batches already run)."""

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self) -> bool:
        """Pass over one more crop, if any are left to skip."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True
