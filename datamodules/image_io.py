"""Image decoding: any common file, or its bytes from a shard -> float (3, H, W) tensor in [-1, 1].

Everything that can go wrong with a file on disk (missing, truncated, not an image, decompression
bomb, unsupported pixel mode) surfaces as :class:`ImageReadError` naming the file, so the caller can
decide to fail or to skip without parsing PIL's many exception types. Bytes read from a shard decode
through the same code (:func:`decode_image`, :func:`decode_uint8`), so a shard sample and the file it
was packed from give the same tensor bit for bit.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Single-channel modes holding 16-bit samples. PIL's "I" is 32-bit signed, but files only produce it for
# 16-bit data (older Pillow opened 16-bit PNGs as "I"), so it is scaled the same way.
_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Modes whose (possible) transparency is composited over white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_EXIF_ORIENTATION = 0x0112
_TIFF_BITS_PER_SAMPLE = 258

# Pillow has no 16-bit multi-channel mode: 16-bit RGB(A) PNGs/TIFFs decode to 8-bit "RGB"/"RGBA" by keeping
# each sample's high byte. Decoding the file a second time with the opposite byte order keeps the low byte
# instead (same bits per pixel, so PNG filtering and TIFF predictors work unchanged); together they give
# the exact 16-bit value. Keys: rawmode PIL chose; values: rawmode that yields the low bytes.
_OTHER_BYTE_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}  # N: native
_LOW_BYTE_RAWMODE: dict[str, str] = {
    f"{base};16{order}": f"{base};16{other}"
    for base in ("RGB", "RGBX", "RGBA")
    for order, other in _OTHER_BYTE_ORDER.items()
}
# 16-bit gray+alpha PNGs decode to RGBA with rawmode "LA;16B"; rawmode "RGBA" has the same 32 bits per
# pixel and hands back the four raw bytes (L hi, L lo, A hi, A lo).
_LA16_RAWMODE = "LA;16B"

# PIL.ImageFile.LOAD_TRUNCATED_IMAGES is process-global; see _strict_truncation.
_TRUNCATION_FLAG_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """A file could not be read as an image; the message always names the file and the problem.

    Built as ``ImageReadError(path, problem)``. The one-argument form ``ImageReadError(message)`` exists
    because ``torch.utils.data.DataLoader`` re-raises worker errors as ``type(err)(formatted_message)``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str | None = None) -> None:
        self.path: str | None = None if problem is None else str(path)
        self.problem = problem
        super().__init__(str(path) if problem is None else f"cannot read image '{path}': {problem}")

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[str | None, ...]]:
        """Keep path/problem across pickling (multiprocessing, DataLoader workers)."""
        if self.path is None:
            return (type(self), (str(self),))
        return (type(self), (self.path, self.problem))


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, extension matched case-insensitively).

    Symlinked sub-folders are followed (datasets are often assembled from links), each real folder once.
    Raises early and loudly: an empty or misspelled folder should fail at setup, not as a zero-length epoch.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder '{root}' is not a directory")
    files = sorted(p for p in walk_files(root) if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder '{root}' holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


def walk_files(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Files below ``root``, following directory symlinks but never entering a real folder twice (cycles).

    A folder that is (or links to) ``exclude`` is not entered: a command's output folder inside its
    input folder must not become input on the next run.
    """
    seen: set[str] = set() if exclude is None else {os.path.realpath(exclude)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()  # deterministic choice of which link reaches a folder first
        yield from (Path(dirpath, name) for name in filenames)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of the image as :func:`load_image` returns it (EXIF rotation included), from the header only.

    Pixel data is not decoded, so a truncated file passes here and fails later in :func:`load_image`.
    """
    with _read_errors(path), Image.open(path) as im:
        _check_supported(im, path)
        w, h = im.size
        # 5-8 are the orientations that swap the axes (transpose, rotate 90/270, transverse).
        return (w, h) if _header_orientation(im) in (5, 6, 7, 8) else (h, w)


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode ``path`` into a float32 (3, H, W) tensor in [-1, 1].

    Conversions, chosen so every file means the same thing to the model:

    - 8-bit RGB, palette (P), CMYK, bilevel: PIL's conversion to RGB, scaled by 255.
    - Grayscale (L): replicated to three equal channels.
    - Transparency (LA, RGBA, PA, P/L/RGB with a ``transparency`` key): alpha-composited over **white**.
      Transparent regions carry no meaningful color, and white is what viewers and most dataset tooling
      show, so the model sees what a person sees; black would invent dark halos around cut-outs.
    - 16-bit grayscale ("I;16", "I;16B", "I"): scaled by 65535, so 65535 -> 1.0 and 32768 -> ~0.0.
    - 16-bit RGB(A) PNG/TIFF: Pillow only keeps the high byte; the low byte is decoded too, so the full
      16-bit value is scaled by 65535 (see ``_LOW_BYTE_RAWMODE``).
    - 32-bit float ("F"): assumed to be in [0, 1]; clipped.
    - EXIF orientation is applied (``PIL.ImageOps.exif_transpose``).

    Truncated files always raise, even if something set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``: a
    half-grey training target is worse than a skipped one.
    """
    with _read_errors(path), Image.open(path) as im:
        _check_supported(im, path)
        rawmodes = _tile_rawmodes(im)
        if rawmodes and all(r in _LOW_BYTE_RAWMODE for r in rawmodes):
            unit = _decode_rgb16(path, im)
        elif rawmodes == [_LA16_RAWMODE]:
            unit = _decode_la16(im)
        else:
            unit = _decode_standard(im, path)
    rgb = _to_rgb(unit)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).mul_(2.0).sub_(1.0)


# --------------------------------------------------------------------------------------------------------
# Encoded bytes (shard samples)


class NamedBytes(io.BytesIO):
    """Encoded image bytes that print as their origin, so ImageReadError names ``shard.tar#key.jpg``."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Encoded bytes -> float32 (3, H, W) in [-1, 1], with every conversion of :func:`load_image`."""
    return load_image(NamedBytes(data, name))  # type: ignore[arg-type]


def decode_uint8(data: bytes, name: str) -> torch.Tensor | None:
    """8-bit RGB / gray images as uint8 (3, H, W) (EXIF rotation applied); None for anything else.

    Cropping before the float conversion saves most of the work on a 2K-8K photo, and
    :func:`uint8_to_unit` of a crop equals the same crop of :func:`decode_image` bit for bit, so cached
    latents stay valid. Alpha, palette, CMYK and 16-bit images return None (use :func:`decode_image`).
    """
    source = NamedBytes(data, name)
    with _read_errors(source), Image.open(source) as im:
        _check_supported(im, source)
        rawmodes = _tile_rawmodes(im)
        if (
            im.mode not in ("RGB", "L")
            or "transparency" in im.info
            or any(r in _LOW_BYTE_RAWMODE or r == _LA16_RAWMODE for r in rawmodes)
        ):
            return None
        _load_strict(im)
        oriented = _oriented(im)
        arr = np.array(oriented)  # a writable copy (torch refuses read-only arrays)
    if arr.dtype != np.uint8:
        return None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (3, h, w) -> float32 in [-1, 1], with exactly the arithmetic of :func:`load_image`."""
    unit = pixels.numpy().astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(unit)).mul_(2.0).sub_(1.0)


# --------------------------------------------------------------------------------------------------------
# Decoding: each returns float32 (H, W, C) in [0, 1], C in {1: gray, 2: gray+alpha, 3: RGB, 4: RGBA}.


def _decode_standard(im: Image.Image, path: str | os.PathLike[str]) -> np.ndarray:
    """Everything Pillow decodes at full precision."""
    _load_strict(im)
    im = _oriented(im)
    mode = im.mode
    if mode in _GRAY16_MODES:
        return _unit(np.asarray(im, dtype=np.float32) / 65535.0)[..., None]
    if mode == "F":
        return _unit(np.asarray(im, dtype=np.float32))[..., None]
    has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        target = "RGBA"
    elif mode in ("1", "L"):
        target = "L"
    else:
        target = "RGB"
    try:
        converted = im.convert(target) if mode != target else im
    except ValueError as exc:  # e.g. "La" has no converter
        raise ImageReadError(path, f"unsupported pixel mode '{mode}' ({exc})") from exc
    arr = np.asarray(converted, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_rgb16(path: str | os.PathLike[str], im: Image.Image) -> np.ndarray:
    """16-bit RGB(A): combine Pillow's high-byte decode with a second, low-byte decode of the same file."""
    _load_strict(im)
    high = np.asarray(_oriented(im), dtype=np.float32)
    with Image.open(path) as low_im:
        low_im.tile = [_with_rawmode(t, _LOW_BYTE_RAWMODE[_rawmode(t) or ""]) for t in low_im.tile]
        _load_strict(low_im)
        low = np.asarray(_oriented(low_im), dtype=np.float32)
    if high.shape != low.shape:  # cannot happen for the rawmodes above; guard against Pillow changes
        raise ImageReadError(path, "inconsistent 16-bit decode")
    return (high * 256.0 + low) / 65535.0


def _decode_la16(im: Image.Image) -> np.ndarray:
    """16-bit gray+alpha PNG: read the raw bytes through the byte-preserving "RGBA" rawmode."""
    im.tile = [_with_rawmode(t, "RGBA") for t in im.tile]
    _load_strict(im)
    raw = np.asarray(_oriented(im), dtype=np.float32)
    gray = raw[..., 0] * 256.0 + raw[..., 1]
    alpha = raw[..., 2] * 256.0 + raw[..., 3]
    return np.stack([gray, alpha], axis=-1) / 65535.0


def _to_rgb(unit: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W, 3): replicate gray, composite alpha over white."""
    channels = unit.shape[-1]
    if channels in (2, 4):
        color, alpha = unit[..., :-1], unit[..., -1:]
        unit = color * alpha + (1.0 - alpha)
    if unit.shape[-1] == 1:
        unit = np.repeat(unit, 3, axis=-1)
    return unit.astype(np.float32, copy=False)


def _unit(arr: np.ndarray) -> np.ndarray:
    """Clip to [0, 1]; NaN (possible in float TIFFs) becomes 0."""
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# PIL plumbing.


def _tile_rawmodes(im: Image.Image) -> list[str | None]:
    return [_rawmode(t) for t in getattr(im, "tile", None) or []]


def _rawmode(tile: ImageFile._Tile) -> str | None:
    """The rawmode of a decoder tile: ``args`` is the rawmode itself (PNG) or a tuple starting with it."""
    args = tile.args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile: ImageFile._Tile, rawmode: str) -> ImageFile._Tile:
    args = rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:])
    return tile._replace(args=args)


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Decode with ``LOAD_TRUNCATED_IMAGES`` off, whatever the rest of the process set it to.

    The flag is process-global, so it is flipped (and restored) only when set, under a lock: with the flag
    on, concurrent decodes in threads of one process are serialised. DataLoader workers are processes and
    the flag is off by default, so normally this costs nothing.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_FLAG_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _load_strict(im: Image.Image) -> None:
    with _strict_truncation():
        im.load()


def _oriented(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block warns and leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, KeyError, TypeError, OSError) as exc:
        name = getattr(im, "filename", "") or "<image>"
        warnings.warn(f"ignoring unreadable EXIF orientation in '{name}': {exc}", stacklevel=3)
        return im


def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PNG's getexif() would decode the whole image)."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except (SyntaxError, ValueError, KeyError, TypeError, OSError):
        return 1
    return orientation if isinstance(orientation, int) else 1


def _check_supported(im: Image.Image, path: str | os.PathLike[str]) -> None:
    """Header-level refusals: empty images, and layouts Pillow would decode wrongly without an error."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"image is empty ({w}x{h})")
    if im.format == "TIFF" and getattr(im, "_planar_configuration", 1) == 2:
        bits = im.tag_v2.get(_TIFF_BITS_PER_SAMPLE, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        if max(bits) > 8:
            # Pillow reads these as 8-bit planes (garbage) or drops the low byte; refuse instead.
            raise ImageReadError(path, "16-bit planar TIFF is not supported; convert it (e.g. to 16-bit PNG)")


def _describe(exc: BaseException) -> str:
    """Short reason for an ImageReadError message."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file (or an unsupported format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels, refused as a possible decompression bomb ({exc})"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if "truncated" in str(exc).lower():
        return f"file is truncated ({exc})"
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def _read_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn whatever PIL or the OS raises while reading ``path`` into an ImageReadError naming it.

    Broad on purpose: decoders for malformed files raise OSError, SyntaxError, ValueError, struct.error,
    zlib.error, EOFError, IndexError, ... and none of them should escape as "not a problem with the file".
    """
    try:
        yield
    except ImageReadError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        raise ImageReadError(path, _describe(exc)) from exc
