"""What a user hands ``tadm demo``'s page, before the codec sees it: a file the page cannot take becomes one
:class:`DemoError` line naming the file; one it takes is read as the commands read it, with notes on how.

Apart from :mod:`tadm.demo.round_trip` (the codec's work) because these rules are about the user's file alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from PIL import Image
from torch import Tensor

from tadm.datamodules.image_io import ImageReadError, image_size, load_image
from tadm.errors import TadmError


class DemoError(TadmError, ValueError):
    """A problem with what a user gave the page (a file, its size, its model): one line naming the file."""


def check_photo(path: str | Path, name: str, max_pixels: int, max_megapixels: float) -> list[str]:
    """Refuse what the page cannot show before decoding (size, tadm LR files); say how the file is read."""
    try:
        h, w = image_size(path)
    except ImageReadError as err:
        raise DemoError(read_error_line(err, name)) from err
    # the header only (``info``: the text chunks before the pixels, where tadm's are); a file that fails
    # here fails with the loader's own message when it is decoded
    mode, info, rawmodes = "", {}, []
    with contextlib.suppress(Exception), Image.open(path) as im:
        mode, info = im.mode, dict(im.info)
        rawmodes = [str(t.args) for t in getattr(im, "tile", None) or []]
    has_alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in info
    if h * w > max_pixels:
        raise DemoError(
            f"{name}: {w}x{h} px ({h * w / 1e6:.1f} MP) is above this demo's limit of {max_megapixels:g} MP "
            "(`tadm demo --max-megapixels`); `tadm downscale` and `tadm upscale` take any size"
        )
    if "tadm:scale" in info:
        raise DemoError(
            f"{name} is an LR file made by tadm (x{info.get('tadm:scale')}, for a {info.get('tadm:hr_size')} "
            "photo): restore it in the 'LR file -> photo' tab"
        )
    notes = []
    if mode == "CMYK":
        notes.append(f"{name} is CMYK: converted to RGB (Pillow's conversion, as `tadm downscale` reads it)")
    elif mode == "P":
        notes.append(f"{name} is a palette image: converted to RGB")
    elif mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16"):
        notes.append(f"{name} is grayscale ({mode}): the codec sees three equal channels")
    if mode.startswith("I;16") or mode == "I" or any(";16" in r for r in rawmodes):
        notes.append(f"{name} has 16 bits per sample: read at full precision; the LR file is 8-bit")
    if has_alpha:
        notes.append(f"{name} has transparency: composited over white")
    return notes


def read_photo(path: str | Path, name: str) -> Tensor:
    """The photo decoded as the commands decode it; a file that fails is one line naming ``name``."""
    try:
        return load_image(path)
    except ImageReadError as err:
        raise DemoError(read_error_line(err, name)) from err


def read_error_line(err: ImageReadError, name: str) -> str:
    """The loader's message with the user's file name instead of the upload's temporary path."""
    return f"{name}: {err.problem}" if err.problem else f"{name}: {err}"


def safe_stem(name: str) -> str:
    """A safe file stem for an uploaded name ("a.v2.jpg" -> "a.v2", as the commands name outputs)."""
    stem = Path(name).stem if "." in name else name
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem).strip("._")
    return safe[:80] or "image"
