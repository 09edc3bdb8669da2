"""Command inputs: image files, folders (recursive), glob patterns and WebDataset shards.

:func:`collect_inputs` gives the codec commands the files to process, each with the output name it gets
(its path relative to the folder it was found in, without suffix); :func:`iter_hr_images` gives
``tadm evaluate`` decoded HR images, from files and shards alike, an unreadable one as a
:class:`BadImage` record instead of an exception.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tadm.datamodules.image_io import IMAGE_EXTENSIONS, ImageReadError, _walk_files, list_images, load_image
from tadm.datamodules.webdataset import (
    IMAGE_FIELDS,
    INDEX_NAME,
    META_FIELD,
    _local_path,
    count_samples,
    decode_image,
    expand_shards,
    index_for,
    iter_shard,
)
from tadm.errors import InputError

_GLOB_CHARS = frozenset("*?[")


@dataclass
class InputFile:
    path: Path
    #: output path relative to the output folder, without suffix
    rel: Path


def collect_inputs(inputs: Sequence[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[InputFile]:
    """Files, folders (recursive) and globs -> input files with their output names.

    Files in folders whose extension is not an image extension are skipped with one warning per
    folder; a path or pattern that matches nothing is an error; two inputs mapping to the same
    output name are an error (before anything is written).
    """
    found: list[InputFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in files if f.suffix.lower() in extensions]
            others = [f for f in files if f.suffix.lower() not in extensions and not f.name.startswith(".")]
            if others:
                warnings.warn(
                    f"{p}: skipping {len(others)} file(s) that are not images by extension "
                    f"(e.g. {others[0].name}); accepted: {', '.join(extensions)}",
                    stacklevel=2,
                )
            if not images:
                raise InputError(f"input folder '{p}' holds no images")
            found += [InputFile(f, f.relative_to(p).parent / f.stem) for f in images]
        elif p.is_file():
            found.append(InputFile(p, Path(p.stem)))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"pattern '{item}' matches no files")
            found += [InputFile(m, Path(m.stem)) for m in matches]
        else:
            raise InputError(f"input '{item}' does not exist")
    seen: dict[Path, Path] = {}
    for f in found:
        if f.rel in seen and seen[f.rel] != f.path:
            raise InputError(
                f"inputs '{seen[f.rel]}' and '{f.path}' would both write '{f.rel}.png'; "
                "pass their folders instead of the files, or run them separately"
            )
        seen[f.rel] = f.path
    unique = {f.path.resolve(): f for f in found}
    return list(unique.values())


@dataclass(frozen=True)
class EvalImage:
    """One decoded HR image: ``path`` names its origin (a file, or ``shard.tar#relative/path.png``)."""

    path: str
    image: Tensor  # float32 (3, H, W) in [-1, 1]


@dataclass(frozen=True)
class BadImage:
    """An input that could not be read: the run goes on, and the report lists it and fails."""

    path: str
    reason: str


@dataclass(frozen=True)
class _Shard:
    url: str
    count: int | None  # samples, when an index.json or a cheap local scan says so


class HRImages:
    """The resolved inputs of :func:`iter_hr_images`: an iterator that also knows how many images to expect.

    Resolution happens up front so a misspelled input fails before any model time is spent, and the
    progress bar gets a total (``operator.length_hint``).
    """

    def __init__(self, sources: list[Path | _Shard]) -> None:
        self.sources = sources
        counts = [1 if isinstance(s, Path) else s.count for s in sources]
        self.total: int | None = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
        self._it = self._generate()

    def __iter__(self) -> Iterator[EvalImage | BadImage]:
        return self

    def __next__(self) -> EvalImage | BadImage:
        return next(self._it)

    def __length_hint__(self) -> int:
        return self.total or 0

    def _generate(self) -> Iterator[EvalImage | BadImage]:
        for source in self.sources:
            if isinstance(source, Path):
                try:
                    yield EvalImage(str(source), load_image(source))
                except ImageReadError as exc:
                    yield BadImage(str(source), str(exc))
            else:
                yield from _iter_shard_images(source.url)


def iter_hr_images(inputs: Sequence[str | os.PathLike[str]]) -> HRImages:
    """HR images from image files, folders (recursive), glob patterns and WebDataset ``.tar`` shards.

    A folder holding an ``index.json`` (written by ``tadm shard``) means its shards; any other folder
    means its image files and ``.tar`` shards. Brace patterns (``val-{000000..000003}.tar``) and remote
    shard URLs (``s3://``, ``pipe:``) are expanded by WebDataset's rules. Inputs are resolved now: a missing
    path, a glob without a match or an empty folder raises ``FileNotFoundError``/``ValueError`` naming it.
    Unreadable images and damaged shards are yielded as :class:`BadImage` when reached.
    """
    if not inputs:
        raise ValueError("no inputs given: pass image files, folders, glob patterns or .tar shards")
    sources: list[Path | _Shard] = []
    seen: set[str] = set()
    duplicates = 0
    for item in inputs:
        for source in _resolve(str(item)):
            ident = str(source.resolve()) if isinstance(source, Path) else source.url
            if ident in seen:
                duplicates += 1
                continue
            seen.add(ident)
            sources.append(source)
    if duplicates:
        warnings.warn(f"{duplicates} input(s) named more than once are evaluated once", stacklevel=2)
    return HRImages(sources)


def _resolve(item: str) -> list[Path | _Shard]:
    if _local_path(item) is None:  # s3://, https://, pipe:... -- existence is only known when read
        return _shards(expand_shards(item))
    path = Path(item).expanduser()
    if path.exists():
        return _resolve_existing(path)
    if any(c in _GLOB_CHARS for c in item):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches the input pattern '{item}'")
        out: list[Path | _Shard] = []
        for match in matches:
            out += _resolve_existing(Path(match))
        return out
    if "{" in item and "}" in item:  # WebDataset brace pattern
        urls = expand_shards(item)
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"input '{item}': shard '{missing[0]}' does not exist")
        return _shards(urls)
    raise FileNotFoundError(f"input '{item}' does not exist")


def _resolve_existing(path: Path) -> list[Path | _Shard]:
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _shards(expand_shards(str(path)))
        try:
            images = list_images(path)
        except ValueError:  # no image files: maybe a folder of shards
            images = []
        tars = sorted(p for p in _walk_files(path) if p.suffix.lower() == ".tar")
        if not images and not tars:
            raise ValueError(
                f"input folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards"
            )
        return [*images, *_shards([str(t) for t in tars])]
    if path.name == INDEX_NAME:
        return _shards(expand_shards(str(path)))
    if path.suffix.lower() == ".tar":
        return _shards([str(path)])
    return [path]  # any other file is read as an image; if it is not one, it becomes a BadImage


def _shards(urls: list[str]) -> list[Path | _Shard]:
    """Shards with their sample counts: from ``index.json`` when listed there, else a header-only scan."""
    if not urls:
        return []
    info = index_for(urls)
    if info is not None:
        return [_Shard(u, c) for u, c in zip(urls, info.counts, strict=True)]
    out: list[Path | _Shard] = []
    for url in urls:
        count: int | None = None
        if _local_path(url) is not None:
            try:
                count = count_samples(url)
            except (OSError, ValueError):
                count = None  # reading it later reports the problem as a BadImage
        out.append(_Shard(url, count))
    return out


def _iter_shard_images(url: str) -> Iterator[EvalImage | BadImage]:
    """Decode every sample of one shard; bad samples and a damaged shard become :class:`BadImage`.

    Read with the project's tar reader rather than ``webdataset.WebDataset``: WebDataset silently drops the
    rest of a truncated shard, which would shrink a test set without anyone noticing.
    """
    shard_errors: list[str] = []
    for _pos, key, fields in iter_shard(url, shard_errors.append):
        ext = next((e for e in IMAGE_FIELDS if e in fields), None)
        if ext is None:
            yield BadImage(
                f"{url}#{key}",
                f"sample has no image field (fields: {sorted(fields)}; expected {IMAGE_FIELDS})",
            )
            continue
        name = f"{url}#{_original_path(fields) or f'{key}.{ext}'}"
        try:
            yield EvalImage(name, decode_image(fields[ext], name))
        except ImageReadError as exc:
            yield BadImage(name, str(exc))
    for message in shard_errors:
        yield BadImage(url, message)


def _original_path(fields: dict[str, bytes]) -> str | None:
    """The source path ``tadm shard`` stored in the sample's ``.json`` (keys are sanitised, paths are not)."""
    try:
        meta = json.loads(fields.get(META_FIELD, b"{}").decode("utf-8"))
    except ValueError:
        return None
    path = meta.get("path") if isinstance(meta, dict) else None
    return path if isinstance(path, str) and path else None
