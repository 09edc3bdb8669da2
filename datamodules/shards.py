"""The shard format in one place: names, URLs, the ``index.json`` beside the shards, and reading tars.

A shard set is a folder (or bucket prefix) of plain tar files, one sample per key: the original image
bytes under their own extension, a ``.json`` of metadata and optionally cached VAE latents, plus an
``index.json`` listing the shards with their sample counts. ``tadm shard`` writes them
(:mod:`tadm.datamodules.shard_writer`); the data module streams them and ``tadm evaluate`` reads them
(:mod:`tadm.datamodules.inputs`), all through the functions here.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from tadm.ops.files import atomic_write_text

#: the shard set's index, next to the shards: ``{"count": N, "shards": [{"name", "count", "size"}], ...}``
INDEX_NAME = "index.json"
INDEX_FORMAT = "tadm-shards"
INDEX_VERSION = 1
#: fields (tar member suffixes) holding the image, in the order they are looked for
IMAGE_FIELDS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
META_FIELD = "json"
#: fp16 array (crops, flips, C, h, w): the VAE latent of each stored crop, unflipped [0] and flipped [1]
LATENT_FIELD = "latents.npy"

ShardSpec = str | list[str]


class SampleError(ValueError):
    """A sample that cannot be used (no image, bad metadata or latents); the message names it."""


# ------------------------------------------------------------------------------------------------------------
# URLs


def expand_shards(spec: ShardSpec | Sequence[str]) -> list[str]:
    """Shard URLs from a list, a brace pattern, a ``::``-joined string, or a folder / ``index.json`` path.

    ``"/data/train"`` (a folder with an ``index.json``) means every shard listed there; ``"s3://b/t-{0..9}.tar"``
    and ``"pipe:curl -s https://host/t-{000..099}.tar"`` are expanded by WebDataset's brace rules.
    """
    import webdataset as wds

    items = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for item in items:
        local = local_path(item)
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


def local_path(url: str) -> Path | None:
    """The filesystem path of a local URL (plain path or ``file:``), None for remote ones and pipes."""
    parsed = urlparse(url)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return Path(url).expanduser()
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def open_url(url: str) -> IO[bytes]:
    """A binary stream for a local path, ``pipe:`` command or remote URL (fsspec first, then WebDataset)."""
    local = local_path(url)
    if local is not None:
        return open(local, "rb")  # noqa: SIM115 -- the caller closes it
    if urlparse(url).scheme != "pipe" and _fsspec_handles(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    import webdataset as wds

    return wds.gopen(url, "rb")


def _fsspec_handles(url: str) -> bool:
    """Whether fsspec has a usable filesystem for ``url``'s scheme (s3, gs, az, hf, memory, ...).

    Raises ImportError with an install hint when fsspec knows the scheme but its backend is missing and
    WebDataset has no opener for it either (s3:// without s3fs).
    """
    try:
        import fsspec
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return False
    scheme = urlparse(url).scheme
    if scheme not in registry and scheme not in known_implementations:
        return False
    try:
        fsspec.get_filesystem_class(scheme)
        return True
    except ImportError as exc:
        import webdataset as wds

        if scheme in wds.gopen_schemes:
            return False  # webdataset has its own opener (curl for http, gsutil for gs)
        raise ImportError(
            f"cannot open '{url}': {exc}. Install the fsspec backend (e.g. `pip install s3fs` for s3://, "
            f"`gcsfs` for gs://) or stream through a command: 'pipe:aws s3 cp {url} -'"
        ) from exc


def check_shards_exist(urls: Iterable[str], split: str) -> None:
    """Fail at setup, naming the file, when a local shard is missing or a URL scheme has no opener.

    Remote shards themselves are only checked when read (a failure then is warned about and counted).
    """
    import webdataset as wds

    schemes: set[str] = set()
    for url in urls:
        local = local_path(url)
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
            if not _fsspec_handles(url) and scheme not in wds.gopen_schemes:
                raise ValueError(
                    f"no opener for '{url}': scheme '{scheme}://' is known to neither fsspec nor WebDataset"
                )


# ------------------------------------------------------------------------------------------------------------
# The index


def new_index(shards: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """An index for ``shards`` (``{"name", "count", "size"}`` each) with the totals; ``fields`` are added."""
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "count": sum(int(s["count"]) for s in shards),
        "size": sum(int(s.get("size", 0)) for s in shards),
        "shards": shards,
        **fields,
    }


def write_index(folder: str | os.PathLike[str], index: dict[str, Any]) -> Path:
    """Write ``folder/index.json`` atomically (a reader never sees half an index)."""
    return atomic_write_text(Path(folder) / INDEX_NAME, json.dumps(index, indent=1) + "\n")


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
        is_local = local_path(url) is not None
        if is_local:
            parent, name = str(Path(url).parent), Path(url).name
        if parent not in parents:
            index_url = str(Path(parent) / INDEX_NAME) if is_local else f"{parent}/{INDEX_NAME}"
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
        local = local_path(url)
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
# The fields of one sample


def image_field(fields: dict[str, bytes], url: str, key: str) -> tuple[bytes, str]:
    """The sample's encoded image and a name for messages (``shard.tar#key.jpg``); SampleError if none."""
    for ext in IMAGE_FIELDS:
        if ext in fields:
            return fields[ext], f"{url}#{key}.{ext}"
    raise SampleError(
        f"sample '{key}' in '{url}' has no image field "
        f"(fields: {sorted(fields)}; expected one of {IMAGE_FIELDS})"
    )


def sample_meta(fields: dict[str, bytes], url: str, key: str) -> dict[str, Any]:
    """The sample's ``.json`` metadata (``{}`` without one); SampleError if it cannot be parsed."""
    if META_FIELD not in fields:
        return {}
    try:
        meta = json.loads(fields[META_FIELD].decode("utf-8"))
    except ValueError as exc:
        raise SampleError(f"sample '{key}' in '{url}' has unreadable .json metadata: {exc}") from exc
    return meta if isinstance(meta, dict) else {}
