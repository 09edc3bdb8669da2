"""WebDataset shards: streaming training crops and whole-image evaluation, from one process to N nodes x M GPUs.

Shards are plain tar files, one sample per key (``tadm shard`` writes them with the original image bytes, a
``.json`` of metadata and optionally cached VAE latents). Nothing here talks to other ranks: rank and world
size come from the trainer, which learns them from Lightning's cluster environments (torchrun, SLURM, ...).
Two rules keep DDP from hanging:

- Training is an endless walk over this rank's shards (``split_by_node`` then ``split_by_worker``), reshuffled
  on every pass and cut into epochs of a fixed number of samples per rank, so every rank runs the same
  number of steps whatever the shard sizes. Ranks read disjoint samples.
- Evaluation splits the *samples* into one contiguous range per rank and pads the short ranks by wrapping
  around to the first samples (as ``DistributedSampler`` does), so every rank runs the same number of
  batches; a damaged sample is replaced by a copy of a good one rather than dropped.

Every random choice is drawn from a generator seeded with (seed, epoch position, rank, worker), where the
epoch position is the number of training batches run before the epoch's iterator started (epoch x batches
per epoch). A run is reproducible; a run resumed from an end-of-epoch checkpoint continues exactly as the
uninterrupted run, and one resumed mid-epoch draws a fresh order for the rest of that epoch instead of
replaying its start. Corrupt samples are skipped with a warning and counted
(``data/num_skipped`` in the logger), never a crash.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from tadm.datamodules.image_folder import check_crop_size, check_positive, reflect_pad
from tadm.datamodules.image_io import (
    _LA16_RAWMODE,
    _LOW_BYTE_RAWMODE,
    ImageReadError,
    _check_supported,
    _load_strict,
    _oriented,
    _read_errors,
    _tile_rawmodes,
    load_image,
)

#: the shard set's index, next to the shards: ``{"count": N, "shards": [{"name", "count", "size"}], ...}``
INDEX_NAME = "index.json"
INDEX_FORMAT = "tadm-shards"
#: fields (tar member suffixes) holding the image, in the order they are looked for
IMAGE_FIELDS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
META_FIELD = "json"
#: fp16 array (crops, flips, C, h, w): the VAE latent of each stored crop, unflipped [0] and flipped [1]
LATENT_FIELD = "latents.npy"

SplitName = Literal["train", "val", "test"]
BadSamplePolicy = Literal["skip", "error"]
ShardSpec = str | list[str]

_STAGE_SPLITS: dict[str, tuple[tuple[SplitName, ...], tuple[SplitName, ...]]] = {
    "fit": (("train",), ("val",)),
    "validate": (("val",), ()),
    "test": (("test",), ()),
}
#: per worker: after this many warnings, further skips are only counted
_MAX_SKIP_WARNINGS = 20

# Every stream below splits itself per rank and per worker, so Lightning's generic caution about __len__ on
# an IterableDataset ("could be inaccurate ... duplicate data") does not apply to them.
warnings.filterwarnings(
    "ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning
)


class SampleSkippedWarning(UserWarning):
    """A corrupt or unusable sample was left out and counted; filterable apart from other warnings."""


class SampleError(ValueError):
    """A sample that cannot be used (no image, bad metadata or latents); the message names it."""


#: what decoding a damaged sample can raise: such a sample is skipped and counted, never a crash
_SAMPLE_ERRORS = (ImageReadError, SampleError, ValueError, TypeError, KeyError, IndexError, OSError, EOFError)


# ------------------------------------------------------------------------------------------------------------
# URLs and the index


def expand_shards(spec: ShardSpec | Sequence[str]) -> list[str]:
    """Shard URLs from a list, a brace pattern, a ``::``-joined string, or a folder / ``index.json`` path.

    ``"/data/train"`` (a folder with an ``index.json``) means every shard listed there; ``"s3://b/t-{0..9}.tar"``
    and ``"pipe:curl -s https://host/t-{000..099}.tar"`` are expanded by WebDataset's brace rules.
    """
    import webdataset as wds

    items = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for item in items:
        local = _local_path(item)
        if local is not None and (local.is_dir() or (local.name == INDEX_NAME and local.is_file())):
            index_path = local / INDEX_NAME if local.is_dir() else local
            if not index_path.is_file():
                raise FileNotFoundError(
                    f"shard folder '{local}' has no {INDEX_NAME}; point at the shards themselves, e.g. "
                    f"'{local}/shard-{{000000..000009}}.tar', or write them with `tadm shard`"
                )
            index = read_index(index_path)
            urls += [str(index_path.parent / s["name"]) for s in index["shards"]]
        else:
            urls += wds.shardlists.expand_urls(item)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def _local_path(url: str) -> Path | None:
    """The filesystem path of a local URL (plain path or ``file:``), None for remote ones and pipes."""
    parsed = urlparse(url)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return Path(url).expanduser()
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def _fsspec_open(url: str) -> IO[bytes] | None:
    """Open ``url`` with fsspec when fsspec has a filesystem for its scheme (s3, gs, az, hf, memory, ...)."""
    try:
        import fsspec
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return None
    scheme = urlparse(url).scheme
    if scheme not in registry and scheme not in known_implementations:
        return None
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:  # e.g. s3:// without s3fs installed
        import webdataset as wds

        if scheme in wds.gopen_schemes:
            return None  # webdataset has its own opener (curl for http, gsutil for gs)
        raise ImportError(
            f"cannot open '{url}': {exc}. Install the fsspec backend (e.g. `pip install s3fs` for s3://, "
            f"`gcsfs` for gs://) or stream through a command: 'pipe:aws s3 cp {url} -'"
        ) from exc
    return fsspec.open(url, "rb").open()


def open_url(url: str) -> IO[bytes]:
    """A binary stream for a local path, ``pipe:`` command or remote URL (fsspec first, then WebDataset)."""
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")  # noqa: SIM115 -- the caller closes it
    if urlparse(url).scheme != "pipe":
        stream = _fsspec_open(url)
        if stream is not None:
            return stream
    import webdataset as wds

    return wds.gopen(url, "rb")


def read_index(path_or_url: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a shard set's ``index.json``; errors name the file."""
    url = str(path_or_url)
    try:
        with open_url(url) as f:
            index = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read shard index '{url}': {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or "shards" not in index:
        raise ValueError(f'\'{url}\' is not a tadm shard index (expected "format": "{INDEX_FORMAT}")')
    return index


@dataclass(frozen=True)
class ShardIndexInfo:
    """What the indexes next to a list of shards say about them."""

    counts: list[int]
    """Samples per shard, in the order of the URL list."""
    latents: dict[str, Any] | None
    """The cached-latent description shared by all these shards (None: none, or they disagree)."""

    @property
    def total(self) -> int:
        return sum(self.counts)


def index_for(urls: Sequence[str]) -> ShardIndexInfo | None:
    """Per-shard counts from the ``index.json`` beside the shards; None if any shard is not listed in one."""
    parents: dict[str, dict[str, Any] | None] = {}
    counts: list[int] = []
    latents: list[Any] = []
    for url in urls:
        if urlparse(url).scheme == "pipe":
            return None
        parent, _, name = url.rpartition("/")
        if _local_path(url) is not None:
            parent, name = str(Path(url).parent), Path(url).name
        if parent not in parents:
            index_url = (
                str(Path(parent) / INDEX_NAME) if _local_path(url) is not None else f"{parent}/{INDEX_NAME}"
            )
            try:
                parents[parent] = read_index(index_url)
            except (ValueError, ImportError):
                parents[parent] = None
        index = parents[parent]
        entry = None if index is None else next((s for s in index["shards"] if s.get("name") == name), None)
        if entry is None:
            return None
        counts.append(int(entry["count"]))
        latents.append((index or {}).get("latents"))
    same = all(lat == latents[0] for lat in latents)
    return ShardIndexInfo(counts, latents[0] if same else None)


def check_shards_exist(urls: Iterable[str], split: str) -> None:
    """Fail at setup, naming the file, when a local shard is missing or a URL scheme has no opener.

    Remote shards themselves are only checked when read (a failure then is warned about and counted).
    """
    schemes: set[str] = set()
    for url in urls:
        local = _local_path(url)
        if local is not None and not local.is_file():
            hint = (
                " (it is a folder: give the folder itself, which needs an index.json)"
                if local.is_dir()
                else ""
            )
            raise FileNotFoundError(f"{split} shard '{local}' does not exist{hint}")
        scheme = urlparse(url).scheme
        if local is None and scheme not in schemes | {"pipe"}:
            schemes.add(scheme)
            _check_scheme(url)


def _check_scheme(url: str) -> None:
    """Raise if neither fsspec nor WebDataset can open ``url``'s scheme (e.g. s3:// without s3fs)."""
    import webdataset as wds

    scheme = urlparse(url).scheme
    try:
        import fsspec
        from fsspec.registry import known_implementations, registry
    except ImportError:
        known = False
    else:
        known = scheme in registry or scheme in known_implementations
        if known:
            try:
                fsspec.get_filesystem_class(scheme)
                return
            except ImportError as exc:
                if scheme not in wds.gopen_schemes:
                    raise ImportError(
                        f"cannot open '{url}': {exc}. Install the fsspec backend (e.g. `pip install s3fs` for "
                        f"s3://, `gcsfs` for gs://) or stream through a command: 'pipe:aws s3 cp {url} -'"
                    ) from exc
    if not known and scheme not in wds.gopen_schemes:
        raise ValueError(
            f"no opener for '{url}': scheme '{scheme}://' is known to neither fsspec nor WebDataset"
        )


# ------------------------------------------------------------------------------------------------------------
# Reading tar shards


_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: key = path up to the first dot
_META_RE = re.compile(r"__[^/]*__($|/)")


class _TailReader:
    """Wraps a shard stream, remembering its first and last bytes to tell a whole tar from a cut one.

    ``tarfile`` reads a tar cut at a 512-byte boundary as a shorter, valid archive; a complete one ends with
    zero blocks, so the last bytes of an uncompressed shard tell the two apart.
    """

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.head = b""
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-2 * tarfile.BLOCKSIZE :]
        return data

    def ends_properly(self) -> bool:
        """Read what is left (padding) and check for the end-of-archive zero blocks."""
        while self.read(1 << 16):
            pass
        if self.head.startswith(self._COMPRESSED):
            return True  # the decompressor checks its own framing
        return len(self.tail) == 2 * tarfile.BLOCKSIZE and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.raw.close()


def iter_shard(
    url: str, on_error: Callable[[str], None], read_data: bool = True
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, {field: bytes}) for each sample of one shard, in tar order.

    A shard that cannot be opened, or breaks off (truncated download, bad block), is reported through
    ``on_error`` and ends there; the sample being read when it broke is dropped, never yielded half.
    With ``read_data=False`` only names are read (fields map to empty bytes): counting a local shard
    then seeks past the data.
    """
    pos = 0
    stream: Any = None
    try:
        local = _local_path(url)
        if not read_data and local is not None:
            stream = open(local, "rb")  # noqa: SIM115
            tar = tarfile.open(fileobj=stream, mode="r:*")  # noqa: SIM115 -- seekable: skips member data
        else:
            stream = _TailReader(open_url(url))
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 -- closed in finally
    except Exception as exc:
        if stream is not None:
            stream.close()
        on_error(f"cannot open shard '{url}': {type(exc).__name__}: {exc}")
        return
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        for member in tar:
            if not member.isreg() or _META_RE.match(member.name):
                continue
            match = _KEY_RE.match(member.name)
            if match is None:
                continue
            base, ext = match.group(1), match.group(2).lower()
            data = b""
            if read_data:
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            if base != key:
                if key is not None:
                    yield pos, key, fields
                    pos += 1
                key, fields = base, {}
            fields[ext] = data
            tar.members = []  # streaming: do not keep every header in memory
        if isinstance(stream, _TailReader) and not stream.ends_properly():
            raise tarfile.ReadError("no end-of-archive marker: the shard is truncated")
        if key is not None:
            yield pos, key, fields
    except Exception as exc:  # GeneratorExit (a consumer stopping early) is not an Exception
        on_error(
            f"shard '{url}' is damaged after {pos} sample(s), the rest is skipped: {type(exc).__name__}: {exc}"
        )
    finally:
        try:
            tar.close()
            stream.close()
        except Exception as exc:  # e.g. a pipe: command that exited with an error status
            on_error(f"closing shard '{url}' failed: {type(exc).__name__}: {exc}")


def count_samples(url: str) -> int:
    """Samples in one shard (reads the whole stream unless the shard is a local file)."""
    errors: list[str] = []
    n = sum(1 for _ in iter_shard(url, errors.append, read_data=False))
    if errors and n == 0:
        raise ValueError(errors[0])
    return n


# ------------------------------------------------------------------------------------------------------------
# Decoding


class _NamedBytes(io.BytesIO):
    """Encoded image bytes that print as their origin, so ImageReadError names ``shard.tar#key.jpg``."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Encoded bytes -> float32 (3, H, W) in [-1, 1], with every conversion of :func:`load_image`."""
    return load_image(_NamedBytes(data, name))  # type: ignore[arg-type]


def decode_uint8(data: bytes, name: str) -> torch.Tensor | None:
    """8-bit RGB / gray images as uint8 (3, H, W) (EXIF rotation applied); None for anything else.

    Cropping before the float conversion saves most of the work on a 2K-8K photo, and
    :func:`uint8_to_unit` of a crop equals the same crop of :func:`decode_image` bit for bit, so cached
    latents stay valid. Alpha, palette, CMYK and 16-bit images return None (use :func:`decode_image`).
    """
    source = _NamedBytes(data, name)
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


class _Pixels:
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


def _image_field(fields: dict[str, bytes], url: str, key: str) -> tuple[bytes, str]:
    for ext in IMAGE_FIELDS:
        if ext in fields:
            return fields[ext], f"{url}#{key}.{ext}"
    raise SampleError(
        f"sample '{key}' in '{url}' has no image (fields: {sorted(fields)}; expected one of {IMAGE_FIELDS})"
    )


def _meta(fields: dict[str, bytes], url: str, key: str) -> dict[str, Any]:
    if META_FIELD not in fields:
        return {}
    try:
        meta = json.loads(fields[META_FIELD].decode("utf-8"))
    except ValueError as exc:
        raise SampleError(f"sample '{key}' in '{url}' has unreadable .json metadata: {exc}") from exc
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------------------------------------------------
# Splitting work: ranks, workers, batches


def split_by_node(items: Sequence[int], rank: int, world_size: int) -> list[int]:
    """WebDataset's ``split_by_node`` with an explicit rank: every ``world_size``-th item from ``rank``."""
    return list(items[rank::world_size])


def split_by_worker(items: Sequence[int], worker: int, num_workers: int) -> list[int]:
    """WebDataset's ``split_by_worker`` with an explicit worker id."""
    return list(items[worker::num_workers])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_batches(num_batches: int, worker: int, num_workers: int) -> list[int]:
    """Batches ``worker`` produces: a DataLoader takes batches from its workers round-robin."""
    return list(range(worker, num_batches, num_workers))


@dataclass(frozen=True)
class _Ownership:
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
    def plan(cls, num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> _Ownership:
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


def _shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
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


class _SkipCounter:
    """Counts (and warns about, up to a limit) the samples one worker leaves out."""

    def __init__(self, source: str, policy: BadSamplePolicy) -> None:
        self.source = source
        self.policy = policy
        self.count = 0

    def skip(self, what: str, exc: BaseException | str) -> None:
        if self.policy == "error":
            if isinstance(exc, BaseException):
                raise exc
            raise SampleError(exc)
        self.count += 1
        if self.count <= _MAX_SKIP_WARNINGS:
            more = (
                " (further skips are only counted: data/num_skipped)"
                if self.count == _MAX_SKIP_WARNINGS
                else ""
            )
            warnings.warn(f"skipping {what}: {exc}{more}", SampleSkippedWarning, stacklevel=2)

    def report(self, message: str) -> None:
        """Callback for shard-level problems (unopenable or damaged shards)."""
        self.skip("shard data", message)


# ------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class LatentSpec:
    """The cached latents a training stream serves: their per-crop shape and whether flips were stored."""

    shape: tuple[int, int, int]
    flips: bool


class _ShardStream(IterableDataset):
    """Shared plumbing: shard list, placement in the world, skip counting."""

    split: str = "train"

    def __init__(
        self,
        urls: Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        on_bad_sample: BadSamplePolicy = "skip",
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("a shard stream needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.urls = list(urls)
        self.rank = rank
        self.world_size = world_size
        self.on_bad_sample: BadSamplePolicy = on_bad_sample
        self._skips = _SkipCounter(f"{self.split}/w0", on_bad_sample)

    @property
    def num_skipped(self) -> int:
        """Samples this process's current iteration left out (DataLoader workers count their own)."""
        return self._skips.count

    def _tag(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample["_skipped"] = self._skips.count
        sample["_source"] = self._skips.source
        return sample


class TrainShardStream(_ShardStream):
    """Endless, reshuffled random crops from this rank's shards, cut to ``samples_per_epoch`` per epoch.

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
        on_bad_sample: ``"skip"`` (warn and count) or ``"error"``.
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
        on_bad_sample: BadSamplePolicy = "skip",
    ) -> None:
        super().__init__(urls, rank, world_size, on_bad_sample)
        if samples_per_epoch < batch_size:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} is less than one batch ({batch_size})")
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

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Seed the next iteration: its epoch, and the training batches run before it (which seeds it).

        ``start_batch`` is ``epoch * len(loader)`` at an epoch's start and more when resuming mid-epoch, so a
        resumed epoch is not a replay. The epoch is informational (when Lightning restores an end-of-epoch
        checkpoint it builds the iterator before advancing its epoch counter).
        """
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def num_batches(self) -> int:
        return self.samples_per_epoch // self.batch_size

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        target = len(_worker_batches(self.num_batches, worker, num_workers)) * self.batch_size
        self._skips = _SkipCounter(f"train/b{self.start_batch}/w{worker}", self.on_bad_sample)
        if target == 0:
            return
        seq = np.random.SeedSequence([self.seed, self.start_batch, self.rank, worker])
        order_rng, shuffle_rng, crop_rng = (np.random.default_rng(s) for s in seq.spawn(3))
        ownership = _Ownership.plan(len(self.urls), self.rank, self.world_size, worker, num_workers)
        stream = self._passes(ownership, order_rng, shuffle_rng, crop_rng)
        for sample in itertools.islice(stream, target):
            yield self._tag(sample)

    def _passes(
        self,
        ownership: _Ownership,
        order_rng: np.random.Generator,
        shuffle_rng: np.random.Generator,
        crop_rng: np.random.Generator,
    ) -> Iterator[dict[str, Any]]:
        """Pass after pass over this worker's shards, each in a new order through the shuffle buffer(s).

        The buffers drain at the end of each pass, so an epoch as long as the worker's share of the data sees
        every sample (crop) exactly once.
        """
        borrow = False
        while True:
            stats = {"read": 0, "owned": 0, "good": 0}
            order = [ownership.shards[i] for i in order_rng.permutation(len(ownership.shards))]
            raw = self._owned_samples(order, ownership, borrow, stats)
            decoded = (
                s
                for item in _shuffled(raw, self.shuffle_buffer, shuffle_rng)
                for s in self._decode(item, crop_rng)
            )
            if self.crops_per_image > 1:  # spread the crops of one image over several batches
                decoded = _shuffled(decoded, 8 * self.crops_per_image, shuffle_rng)
            for sample in decoded:
                stats["good"] += 1
                yield sample
            if stats["good"]:
                continue
            shards = ", ".join(f"'{self.urls[i]}'" for i in ownership.shards[:3])
            if stats["owned"]:
                raise RuntimeError(
                    f"none of the {stats['owned']} samples of shard(s) {shards} ... could be used"
                )
            if not stats["read"]:
                raise RuntimeError(f"no readable sample in shard(s) {shards} ... (see the warnings above)")
            # fewer samples than (rank, worker) slots: better repeat another slot's data than stall DDP
            warnings.warn(
                f"rank {self.rank} worker {ownership.worker} owns no sample of {len(self.urls)} shard(s); it reads "
                "samples of other workers instead. Use more (smaller) shards or fewer num_workers.",
                SampleSkippedWarning,
                stacklevel=2,
            )
            borrow = True

    def _owned_samples(
        self, order: list[int], ownership: _Ownership, borrow: bool, stats: dict[str, int]
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        for shard in order:
            url = self.urls[shard]
            for pos, key, fields in iter_shard(url, self._skips.report):
                stats["read"] += 1
                if borrow or ownership.owns(shard, pos):
                    stats["owned"] += 1
                    yield url, key, fields

    def _decode(
        self, item: tuple[str, str, dict[str, bytes]], rng: np.random.Generator
    ) -> list[dict[str, Any]]:
        url, key, fields = item
        try:
            data, name = _image_field(fields, url, key)
            meta = _meta(fields, url, key)
            pixels = _Pixels(data, name, self.crop_size)
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
            self._skips.skip(f"sample '{key}' of '{url}'", exc)
            return []

    def _latent_crops(
        self,
        pixels: _Pixels,
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


class EvalShardStream(_ShardStream):
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
        on_bad_sample: BadSamplePolicy = "skip",
    ) -> None:
        self.split = split
        super().__init__(urls, rank, world_size, on_bad_sample)
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
        for j in _worker_batches(math.ceil(self.per_rank / b), worker, num_workers):
            for p in range(j * b, min((j + 1) * b, self.per_rank)):
                out.append((self.rank * self.per_rank + p) % self.total)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        self._skips = _SkipCounter(f"{self.split}/w{worker}", self.on_bad_sample)
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
            for pos, key, fields in iter_shard(url, self._skips.report):
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
                    f"sample {pos} of '{url}'", "the shard ended before it (index.json says it exists)"
                )
                owed += 1
        if owed:
            if last_good is None:
                last_good = self._any_good_sample()
            for _ in range(owed):
                yield self._tag(dict(last_good))

    def _decode(self, url: str, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        try:
            data, name = _image_field(fields, url, key)
            meta = _meta(fields, url, key)
            return {"image": decode_image(data, name), "key": key, "path": str(meta.get("path", key))}
        except _SAMPLE_ERRORS as exc:
            self._skips.skip(f"sample '{key}' of '{url}'", exc)
            return None

    def _any_good_sample(self) -> dict[str, Any]:
        """A stand-in for a worker whose samples all failed: the first good one of the whole split."""
        quiet = _SkipCounter(self._skips.source, "skip")
        for url in self.urls:
            for _, key, fields in iter_shard(url, quiet.report):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SampleSkippedWarning)
                    saved, self._skips = self._skips, quiet
                    try:
                        sample = self._decode(url, key, fields)
                    finally:
                        self._skips = saved
                if sample is not None:
                    return sample
        raise RuntimeError(
            f"no readable image in any of the {len(self.urls)} {self.split} shard(s): {self.urls[:3]}"
        )


def _eval_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        return default_collate(batch)
    except RuntimeError as exc:
        sizes = sorted({tuple(s["image"].shape[-2:]) for s in batch})
        if len(sizes) > 1:
            raise ValueError(
                f"evaluation images of different sizes {sizes} cannot share a batch; set val_batch_size: 1"
            ) from exc
        raise


class _StreamLoader(DataLoader):
    """A DataLoader that tells its training stream where it starts (epoch, batches run) on every ``iter``.

    ``state_dict`` makes Lightning treat it as resumable: a run resumed mid-epoch seeds the rest of that
    epoch with the resumed position, so it neither replays the epoch's start nor needs to re-read it.
    """

    def __init__(
        self, dataset: Any, *args: Any, position: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._position = position
        self._manual_epoch = 0

    def __iter__(self) -> Any:
        stream = self.dataset
        if isinstance(stream, TrainShardStream):
            if self._position is not None:
                stream.set_position(*self._position())
            else:  # used outside a Trainer: every iteration is a new epoch
                stream.set_position(self._manual_epoch, self._manual_epoch * len(self))
                self._manual_epoch += 1
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        stream = self.dataset
        if isinstance(stream, TrainShardStream):
            return {"epoch": stream.epoch, "start_batch": stream.start_batch, "seed": stream.seed}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the position comes from the trainer's restored epoch and step."""


# ------------------------------------------------------------------------------------------------------------
# The data module


class WebDatasetDataModule(L.LightningDataModule):
    """WebDataset tar shards for fit / validate / test, streaming, on one process or many nodes.

    Data placement needs no collective: every rank reads its own shards (training) or its own range of
    samples (evaluation), and all ranks run the same number of batches. Works unchanged under ``torchrun``
    and SLURM (Lightning's cluster environments give rank and world size). DataLoader workers are started
    per epoch (not persistent), so each epoch's stream is seeded from the trainer's epoch and step.

    Args:
        train_shards: Training shards: a folder holding ``index.json`` (written by ``tadm shard``), a list of
            URLs, a brace pattern (``/data/train/shard-{000000..000099}.tar``), ``pipe:`` commands
            (``pipe:aws s3 cp s3://bucket/shard-000000.tar -``) or fsspec URLs (``s3://``, ``gs://``, with the
            matching fsspec backend installed). Required for ``fit``.
        val_shards: Validation shards (same forms); whole images, evaluated with the same number of batches
            on every rank. Optional for ``fit``, required for ``validate``.
        test_shards: Test shards; required for ``test``.
        crop_size: Side of the square training crop; a positive multiple of ``scale`` and of 8.
        batch_size: Training batch size per rank.
        val_batch_size: Batch size for validation and test (images must then share one size).
        num_workers: DataLoader worker processes per rank; shards are split between them.
        scale: Downscaling factor of the model (linked from ``model.scale``); constrains ``crop_size``.
        samples_per_epoch: Training samples (crops) per epoch *per rank*, rounded down to whole batches.
            Default: one pass over the shards, ``images x crops_per_image // world size`` (needs the shards'
            ``index.json``).
        shuffle_buffer: Encoded training samples held for shuffling, per worker. Memory is this times the mean
            file size (64 x 3 MB photos = 192 MB per worker; fewer for 8K photos); 1 disables shuffling within
            a pass (shard order is still reshuffled every pass).
        crops_per_image: Training crops cut from each decoded image. Decoding a 2K-8K photo costs far more than
            cropping it; 2-4 raises throughput accordingly, at the price of correlated crops (spread over
            batches by a buffer of ``8 x crops_per_image`` decoded crops per worker).
        flip: Random horizontal flips in training. With cached latents a flip is applied only when the shards
            store the flipped crops' latents too (``tadm shard`` does by default); otherwise flips are off.
        latents: Serve the shards' cached VAE latents (``batch["latent"]``, fp16) so training skips the encoder.
            ``None``: when the index says they exist and were made by the model's backbone at this crop size.
            ``True``: required (an error names what does not match). ``False``: never. Crops are then the
            stored fixed crops (``tadm shard --crops-per-image``), not random ones.
        seed: Base seed; every training stream is seeded with (seed, training batches before the epoch's
            iterator started, rank, worker): reproducible runs, and no replayed order after a mid-epoch resume.
        on_bad_sample: ``"skip"``: corrupt samples are warned about, left out and counted (``num_skipped``,
            logged as ``data/num_skipped``). ``"error"``: the first one raises (debugging).
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        crop_size: int = 256,
        batch_size: int = 4,
        val_batch_size: int = 1,
        num_workers: int = 0,
        scale: int = 16,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 64,
        crops_per_image: int = 1,
        flip: bool = True,
        latents: bool | None = None,
        seed: int = 0,
        on_bad_sample: BadSamplePolicy = "skip",
    ) -> None:
        super().__init__()
        check_positive(
            scale=scale,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            crops_per_image=crops_per_image,
            shuffle_buffer=shuffle_buffer,
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} must be at least batch_size={batch_size}"
            )
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        check_crop_size(crop_size, scale)
        self.save_hyperparameters()
        self.shards: dict[SplitName, ShardSpec | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
        }
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.scale = scale
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.crops_per_image = crops_per_image
        self.flip = flip
        self.latents = latents
        self.seed = seed
        self.on_bad_sample: BadSamplePolicy = on_bad_sample
        self.datasets: dict[SplitName, _ShardStream] = {}
        self._skips: dict[str, int] = {}
        self._logged_skips = 0

    # ----------------------------------------------------------------------------------------------------
    # setup

    def _rank_world(self) -> tuple[int, int]:
        """From the trainer (set by Lightning's cluster environment); else the launcher's environment."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists of ``stage`` and build its streams for this rank."""
        rank, world = self._rank_world()
        for split in self._splits_for(stage):
            if split in self.datasets:
                continue
            spec = self.shards[split]
            assert spec is not None
            urls = expand_shards(spec)
            check_shards_exist(urls, split)
            index = index_for(urls)
            if split == "train":
                self.datasets[split] = self._train_stream(urls, index, rank, world)
            else:
                if index is not None:
                    counts = index.counts
                else:
                    warnings.warn(
                        f"no index.json next to the {split} shards: counting their samples (reads them once)",
                        stacklevel=2,
                    )
                    counts = [count_samples(u) for u in urls]
                self.datasets[split] = EvalShardStream(
                    urls, counts, self.val_batch_size, rank, world, split, self.on_bad_sample
                )

    def _splits_for(self, stage: str | None) -> list[SplitName]:
        if stage is None:
            splits = [s for s, spec in self.shards.items() if spec is not None]
            if not splits:
                raise ValueError(
                    "WebDatasetDataModule has no shards configured (train_shards, val_shards, ...)"
                )
            return splits
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"WebDatasetDataModule supports stages {sorted(_STAGE_SPLITS)}, not {stage!r}")
        required, optional = _STAGE_SPLITS[stage]
        for split in required:
            if self.shards[split] is None:
                raise ValueError(f"stage '{stage}' needs {split}_shards, which is not set")
        return [*required, *(s for s in optional if self.shards[s] is not None)]

    def _train_stream(
        self, urls: list[str], index: ShardIndexInfo | None, rank: int, world: int
    ) -> TrainShardStream:
        latent = self._latent_spec(index)
        per_rank = self.samples_per_epoch
        if per_rank is None:
            if index is None:
                raise ValueError(
                    "samples_per_epoch is not set and the training shards have no index.json to count them; "
                    "set data.init_args.samples_per_epoch (samples per epoch per rank)"
                )
            crops = self.crops_per_image
            if latent is not None and index.latents is not None:
                crops = min(crops, int(index.latents.get("crops_per_image", crops)))
            per_rank = index.total * crops // world  # one pass: every image's crops once
            if per_rank < self.batch_size:
                raise ValueError(
                    f"{index.total} training images over {world} rank(s) make less than one batch of "
                    f"{self.batch_size} per rank; set samples_per_epoch"
                )
        return TrainShardStream(
            urls,
            crop_size=self.crop_size,
            batch_size=self.batch_size,
            samples_per_epoch=per_rank,
            rank=rank,
            world_size=world,
            crops_per_image=self.crops_per_image,
            flip=self.flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            latent=latent,
            on_bad_sample=self.on_bad_sample,
        )

    def _latent_spec(self, index: ShardIndexInfo | None) -> LatentSpec | None:
        """Decide once, at setup, whether training serves cached latents (every batch must agree)."""
        if self.latents is False:
            return None
        meta = index.latents if index is not None else None
        model = self.trainer.lightning_module if self.trainer is not None else None
        backbone = getattr(model, "backbone", None)
        wanted_id = getattr(backbone, "backbone_id", None)
        rescaler = getattr(model, "rescaler", None)
        problem = None
        if meta is None:
            problem = "the training shards' index.json describes no cached latents (`tadm shard --latents`)"
        elif int(meta.get("crop", -1)) != self.crop_size:
            problem = (
                f"the latents were cached for crops of {meta.get('crop')}, not crop_size={self.crop_size}"
            )
        elif wanted_id is not None and meta.get("backbone_id") != wanted_id:
            problem = (
                f"the latents come from backbone {meta.get('backbone_id')!r}, the model uses {wanted_id!r}"
            )
        elif self.latents is None and getattr(rescaler, "space", "latent") != "latent":
            return None  # a pixel-space rescaler has no use for them
        if problem is not None:
            if self.latents:
                raise ValueError(f"latents: true, but {problem}")
            if meta is not None:
                warnings.warn(f"not using the cached latents: {problem}; encoding on the fly", stacklevel=3)
            return None
        assert meta is not None
        flips = bool(meta.get("flips"))
        if self.flip and not flips:
            warnings.warn(
                "the shards cache latents of unflipped crops only: random flips are off "
                "(`tadm shard` stores flipped latents unless --no-flip-latents)",
                stacklevel=3,
            )
        c, h, w = (int(v) for v in meta["shape"])
        return LatentSpec((c, h, w), flips)

    # ----------------------------------------------------------------------------------------------------
    # dataloaders

    def _position(self) -> tuple[int, int]:
        """(epoch, training batches run so far): restored from a checkpoint before the first ``iter``."""
        trainer = self.trainer
        assert trainer is not None
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        done = progress.total.ready if progress is not None else trainer.global_step
        return int(trainer.current_epoch), int(done)

    def _dataset(self, split: SplitName, stage: str) -> _ShardStream:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split} shards loaded: call setup('{stage}') first (Lightning does this for you)"
            )
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", "fit")
        return _StreamLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            position=self._position if self.trainer is not None else None,
        )

    def _eval_loader(self, split: SplitName, stage: str) -> DataLoader:
        return _StreamLoader(
            self._dataset(split, stage),
            batch_size=self.val_batch_size,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_eval_collate,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.shards["val"] is None:
            return []  # nothing to validate during fit
        return self._eval_loader("val", "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", "test")

    # ----------------------------------------------------------------------------------------------------
    # skip counting

    @property
    def num_skipped(self) -> int:
        """Samples left out on this rank so far, as reported by the batches (all workers, all epochs)."""
        return sum(self._skips.values())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the workers' skip counters out of the batch and log their total as ``data/num_skipped``."""
        if isinstance(batch, dict) and "_skipped" in batch:
            counts = batch.pop("_skipped")
            sources = batch.pop("_source")
            for source, count in zip(sources, counts.tolist(), strict=True):
                self._skips[source] = max(self._skips.get(source, 0), int(count))
            total = self.num_skipped
            trainer = self.trainer
            if total > self._logged_skips and trainer is not None and trainer.logger is not None:
                trainer.logger.log_metrics({"data/num_skipped": total}, step=trainer.global_step)
                self._logged_skips = total
        return batch

    def teardown(self, stage: str) -> None:
        if self.num_skipped:
            rank, _ = self._rank_world()
            warnings.warn(
                f"rank {rank}: {self.num_skipped} corrupt or unusable sample(s) were skipped (see the warnings)",
                SampleSkippedWarning,
                stacklevel=2,
            )
