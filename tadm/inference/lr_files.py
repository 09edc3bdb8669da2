"""LR image files: 8-bit PNGs that carry what the upscaler needs, written atomically.

An LR file holds exactly the quantised LR tensor the model produced (every value is k/127.5 - 1
for an integer k, so the PNG stores k losslessly). PNG text chunks record the original HR size, the
scale and the ids of the checkpoint, so ``tadm upscale`` restores the original size alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from tadm.datamodules.image_io import ImageReadError
from tadm.errors import OutputWriteError
from tadm.ops.files import DestinationExists, atomic_write

FORMAT_VERSION = "1"
_PREFIX = "tadm:"


@dataclass(frozen=True)
class LRMeta:
    """What an LR file says about how it was made."""

    hr_height: int
    hr_width: int
    scale: int
    rescaler_id: str
    model_id: str
    version: str = FORMAT_VERSION

    def to_text(self) -> dict[str, str]:
        return {
            f"{_PREFIX}version": self.version,
            f"{_PREFIX}hr_size": f"{self.hr_width}x{self.hr_height}",
            f"{_PREFIX}scale": str(self.scale),
            f"{_PREFIX}rescaler_id": self.rescaler_id,
            f"{_PREFIX}model_id": self.model_id,
        }

    @classmethod
    def from_text(cls, text: dict[str, str], path: str | os.PathLike[str]) -> LRMeta | None:
        """None when the file has no tadm metadata; an error naming the file when it is malformed."""
        if f"{_PREFIX}scale" not in text:
            return None
        try:
            w, h = (int(v) for v in text[f"{_PREFIX}hr_size"].lower().split("x"))
            return cls(
                hr_height=h,
                hr_width=w,
                scale=int(text[f"{_PREFIX}scale"]),
                rescaler_id=text.get(f"{_PREFIX}rescaler_id", ""),
                model_id=text.get(f"{_PREFIX}model_id", ""),
                version=text.get(f"{_PREFIX}version", FORMAT_VERSION),
            )
        except (KeyError, ValueError) as err:
            raise ImageReadError(path, f"malformed tadm metadata {text}: {err}") from err


def to_uint8(y: Tensor) -> np.ndarray:
    """(1,3,h,w) or (3,h,w) in [-1,1] -> (h,w,3) uint8, with the quantiser's own rounding."""
    y = y.detach().float().cpu()
    if y.ndim == 4:
        if y.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {y.shape[0]}")
        y = y[0]
    v = ((y + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)
    return v.permute(1, 2, 0).contiguous().numpy()


def from_uint8(arr: np.ndarray) -> Tensor:
    """(h,w,3) uint8 -> (1,3,h,w) float in [-1,1], bit-identical to the quantiser's output."""
    v = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float()
    return (v / 127.5 - 1.0)[None]


def write_png(
    path: str | os.PathLike[str], image: Tensor, text: dict[str, str] | None = None, overwrite: bool = True
) -> Path:
    """Save an image in [-1,1] as an 8-bit RGB PNG (optionally with text chunks), atomically.

    ``overwrite=False`` never replaces an existing file, even one another run finished while this one
    was encoding: :class:`~tadm.ops.files.DestinationExists` then (the codec commands count it skipped). Any
    other failure to write is an :class:`~tadm.errors.OutputWriteError` naming ``path``."""
    arr = to_uint8(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)

    def write(tmp: Path) -> None:
        Image.fromarray(arr, mode="RGB").save(tmp, format="PNG", pnginfo=info, compress_level=6)

    try:
        return atomic_write(path, write, overwrite=overwrite)
    except DestinationExists:
        raise
    except OSError as err:  # a full disk, a quota, a read-only folder: name the file, not just the errno
        raise OutputWriteError.of(path, err) from err


def write_lr(path: str | os.PathLike[str], y: Tensor, meta: LRMeta, overwrite: bool = True) -> Path:
    """Write the quantised LR tensor ``y`` with its metadata; refuses values off the 8-bit grid
    (``overwrite``: as :func:`write_png`)."""
    v = (y.detach().float().cpu() + 1.0) * 127.5
    if (v - v.round()).abs().max() > 1e-3 or v.min() < -1e-3 or v.max() > 255.001:
        raise ValueError("LR tensor is not an 8-bit image in [-1, 1]: is the rescaler in eval mode?")
    return write_png(path, y, meta.to_text(), overwrite=overwrite)


def read_lr(path: str | os.PathLike[str]) -> tuple[Tensor, LRMeta | None]:
    """Read an LR file -> ((1,3,h,w) in [-1,1], its metadata or None).

    8-bit RGB files are read exactly; anything else (16-bit, gray, alpha, JPEG ...) goes through
    the robust loader and is rounded to 8 bits, since the model only ever produced 8-bit LR images.
    """
    from tadm.datamodules.image_io import load_image

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            exact = im.mode == "RGB"
            if exact:
                im.load()
                arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    meta = LRMeta.from_text(text, path)
    if exact:
        return from_uint8(arr), meta
    y = load_image(path)[None]
    return from_uint8(to_uint8(y)), meta


@dataclass(frozen=True)
class LRHeader:
    """What an LR file's header says, without decoding its pixels: its (h, w) and the (H, W) it restores to."""

    lr_size: tuple[int, int]
    hr_size: tuple[int, int]


def read_lr_header(path: str | os.PathLike[str], scale: int) -> LRHeader | None:
    """The sizes of an LR file from its PNG header and text chunks (``scale`` x its size without tadm metadata),
    for grouping files into batches (the batch still checks the decoded file); None when the header cannot be
    read (reading the file reports why)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # the text chunks before the pixels (where write_png puts them): ``im.text`` would decode the image
            meta = LRMeta.from_text({k: v for k, v in im.info.items() if isinstance(v, str)}, path)
    except (OSError, SyntaxError, ValueError):  # ImageReadError is a ValueError
        return None
    hr = (h * scale, w * scale) if meta is None else (meta.hr_height, meta.hr_width)
    return LRHeader((h, w), hr)
