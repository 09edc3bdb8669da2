"""Command inputs: image files, folders (recursive), glob patterns and WebDataset shards, one set of rules.

:func:`resolve_inputs` turns command-line items into sources: :class:`InputFile` (an image file with the
output name it gets) and :class:`InputShard` (a tar shard). Both readers of command inputs use it:
:func:`collect_inputs` gives the codec commands the files to process, and :func:`iter_hr_images` gives
``tadm evaluate`` decoded HR images, from files and shards alike, an unreadable one as a :class:`BadImage`
record instead of an exception. Inputs are resolved up front, so a misspelled one fails (with an
:class:`~tadm.errors.InputError` naming it) before any model time is spent.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tadm.datamodules.image_io import IMAGE_EXTENSIONS, ImageReadError, decode_image, load_image, walk_files
from tadm.datamodules.shards import (
    INDEX_NAME,
    SampleError,
    count_samples,
    expand_shards,
    image_field,
    index_for,
    iter_shard,
    local_path,
    sample_meta,
)
from tadm.errors import InputError

_GLOB_CHARS = frozenset("*?[")
_SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class InputFile:
    """An image file, and its output name: its path relative to the folder it was found in, without suffix
    (a file named or matched directly: its stem)."""

    path: Path
    rel: Path
    root: Path | None = None
    """The folder given on the command line that it was found in (None: named or matched directly); a clash
    of output names gets a hint that fits."""


@dataclass(frozen=True)
class InputShard:
    """A WebDataset tar shard (path or URL) and its sample count, when an index.json or a cheap scan says."""

    url: str
    count: int | None


Source = InputFile | InputShard


def resolve_inputs(
    items: Sequence[str | os.PathLike[str]],
    shards: bool = True,
    exclude: str | os.PathLike[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[Source]:
    """Command-line items -> the image files and shards they name, in order, each once.

    - A file is an image whatever its extension (a named file is read, and reported as a bad image if it is
      not one); a ``.tar`` file is a shard and an ``index.json`` the shards it lists.
    - A folder is searched recursively (symlinked folders followed, each real folder once): its image files
      by extension and its ``.tar`` shards. Other files are skipped with one warning per folder (hidden
      files and the ``index.json`` of shards are not mentioned). A folder holding an ``index.json`` means
      the shards listed there.
    - A glob pattern (``*``, ``?``, ``[...]``; ``**`` recurses) means each match, as if named on its own.
    - A brace pattern (``val-{000000..000003}.tar``) and a remote URL (``s3://``, ``pipe:``) mean shards,
      expanded by WebDataset's rules; remote shards are only checked when read.
    - The same file or shard named twice is used once, with one warning for all such repeats.

    Args:
        items: What the user typed.
        shards: Accept shards; without, a shard is an :class:`InputError` and a folder's ``.tar`` files are
            skipped like any other non-image file.
        exclude: A folder nothing is collected from (the command's output folder): walks do not enter it,
            a pattern's matches inside it are dropped, and an item inside it is an error.
        extensions: What makes a file in a folder an image (lower case, with the dot).

    Raises:
        InputError: naming the item, for no items, a missing path, a pattern without a match, a folder with
            nothing to read, a shard where none is accepted, an item inside ``exclude``.
    """
    if not items:
        what = "image files, folders, glob patterns" + (" or .tar shards" if shards else "")
        raise InputError(f"no inputs given: pass {what}")
    rules = _Rules(shards, None if exclude is None else Path(exclude), tuple(e.lower() for e in extensions))
    sources: list[Source] = []
    seen: set[str] = set()
    repeats = 0
    for item in items:
        reached: set[str] = set()
        for source in rules.resolve(str(item)):
            ident = _identity(source)
            if ident in reached:  # one pattern reaching a file twice (a match, and inside a matched folder)
                continue
            reached.add(ident)
            if ident in seen:
                repeats += 1
                continue
            seen.add(ident)
            sources.append(source)
    if repeats:
        warnings.warn(f"{repeats} input(s) named more than once are processed once", stacklevel=2)
    return sources


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude: str | os.PathLike[str] | None = None,
) -> list[InputFile]:
    """Files, folders (recursive) and globs -> input files with their output names (:func:`resolve_inputs`).

    Shards are refused (the codec commands read image files); two inputs that would write the same output
    name are an :class:`InputError` before anything is written.
    """
    sources = resolve_inputs(inputs, shards=False, exclude=exclude, extensions=extensions)
    files = [s for s in sources if isinstance(s, InputFile)]  # without shards, that is all of them
    check_output_names(files)
    return files


def check_output_names(files: Sequence[InputFile]) -> None:
    """Raise an InputError naming both files when two inputs would write the same output name."""
    owner: dict[Path, InputFile] = {}
    for f in files:
        first = owner.setdefault(f.rel, f)
        if first.path != f.path:
            raise InputError(
                f"inputs '{first.path}' and '{f.path}' would both write '{f.rel}.png': {_clash_hint(first, f)}"
            )


def _clash_hint(first: InputFile, second: InputFile) -> str:
    """What to do about two inputs with one output name, for the way they were passed."""
    if first.root is None and second.root is None:
        return (
            "files named directly are written under their stem; pass a folder that holds both (outputs keep "
            "their paths inside it), or run them separately into different output folders"
        )
    if first.root is not None and first.root == second.root:
        return (
            f"they have the same stem in '{first.path.parent}': rename one, or run them separately into "
            "different output folders"
        )
    return (
        "outputs are named by each file's path inside the folder given (a file named directly: its stem), "
        "without the extension; run them separately, into different output folders"
    )


# ------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class _Rules:
    shards: bool
    exclude: Path | None
    extensions: tuple[str, ...]

    def resolve(self, item: str) -> list[Source]:
        path = Path(item).expanduser()
        local = path if path.exists() else local_path(item)
        if local is None:  # s3://, https://, pipe:... -- existence is only known when read
            self._need_shards(item, "a URL")
            return _shards(expand_shards(item))
        if local.exists():
            self._check_not_excluded(item, local)
            return self._existing(item, local)
        if any(c in _GLOB_CHARS for c in item):
            matches = [Path(m) for m in sorted(glob.glob(str(local), recursive=True))]
            kept = [m for m in matches if not self._excluded(m)]
            if not kept:
                outside = f" outside '{self.exclude}'" if matches else ""
                raise InputError(f"no file matches the input pattern '{item}'{outside}")
            return [s for m in kept for s in self._existing(str(m), m)]
        if self.shards and "{" in item and "}" in item:  # WebDataset brace pattern
            urls = expand_shards(item)
            missing = [u for u in urls if not Path(u).exists()]
            if missing:
                raise InputError(f"input '{item}': shard '{missing[0]}' does not exist")
            return _not_empty(item, _shards(urls), "names shards")
        raise InputError(f"input '{item}' does not exist")

    def _existing(self, item: str, path: Path) -> list[Source]:
        if path.is_dir():
            if self.shards and (path / INDEX_NAME).is_file():
                return _not_empty(item, _shards(self._index_urls(item, path)), "lists shards")
            return _not_empty(str(path), self._folder(path), "folder")
        if path.name == INDEX_NAME:
            self._need_shards(item, "a shard index")
            return _not_empty(item, _shards(self._index_urls(item, path)), "lists shards")
        if path.suffix.lower() == _SHARD_SUFFIX:
            self._need_shards(item, "a WebDataset shard")
            return _not_empty(item, _shards([str(path)]), "shard")
        return [InputFile(path, Path(path.stem))]

    def _folder(self, folder: Path) -> list[Source]:
        images: list[Path] = []
        tars: list[Path] = []
        others: list[Path] = []
        for f in walk_files(folder, exclude=self.exclude):
            suffix = f.suffix.lower()
            if suffix in self.extensions:
                images.append(f)
            elif self.shards and suffix == _SHARD_SUFFIX:
                tars.append(f)
            elif not (f.name.startswith(".") or (self.shards and f.name == INDEX_NAME)):
                others.append(f)
        if others:
            others.sort()
            warnings.warn(
                f"{folder}: skipping {len(others)} file(s) that are not images by extension "
                f"(e.g. {others[0].name}); accepted: {', '.join(self.extensions)}",
                stacklevel=2,
            )
        if not images and not tars:
            kinds = ", ".join(self.extensions)
            if self.shards:
                raise InputError(f"input folder '{folder}' holds no images ({kinds}) and no .tar shards")
            has_tars = any(o.suffix.lower() == _SHARD_SUFFIX for o in others)
            hint = " (it holds .tar shards, which this command does not read)" if has_tars else ""
            raise InputError(f"input folder '{folder}' holds no images ({kinds}){hint}")
        files: list[Source] = [
            InputFile(f, f.relative_to(folder).parent / f.stem, folder) for f in sorted(images)
        ]
        return files + _shards([str(t) for t in sorted(tars)])

    def _index_urls(self, item: str, path: Path) -> list[str]:
        try:
            return expand_shards(str(path))
        except ValueError as exc:
            raise InputError(f"input '{item}': {exc}") from exc

    def _need_shards(self, item: str, what: str) -> None:
        if not self.shards:
            raise InputError(f"input '{item}' is {what}; this command reads local image files only")

    def _excluded(self, path: Path) -> bool:
        return self.exclude is not None and path.resolve().is_relative_to(self.exclude.resolve())

    def _check_not_excluded(self, item: str, path: Path) -> None:
        if self._excluded(path):
            raise InputError(
                f"input '{item}' is inside '{self.exclude}', the folder inputs are never read from "
                "(the output folder)"
            )


def _not_empty(item: str, sources: list[Source], what: str) -> list[Source]:
    """``sources`` unless they are all shards known to hold no samples: an input that gives nothing to read is
    an error, as an empty folder is (else an empty shard gives a report of 0 images and exit status 0)."""
    if sources and all(isinstance(s, InputShard) and s.count == 0 for s in sources):
        if what == "folder":
            raise InputError(f"input folder '{item}' holds no images and its .tar shards hold no samples")
        if what == "shard":
            raise InputError(f"input '{item}' is a shard with no samples")
        raise InputError(f"input '{item}' {what} that hold no samples")
    return sources


def _identity(source: Source) -> str:
    if isinstance(source, InputFile):
        return str(source.path.resolve())
    local = local_path(source.url)
    return str(local.resolve()) if local is not None else source.url


def _shards(urls: list[str]) -> list[Source]:
    """Shards with their sample counts: from ``index.json`` when listed there, else a header-only scan."""
    if not urls:
        return []
    info = index_for(urls)
    if info is not None:
        return [InputShard(u, c) for u, c in zip(urls, info.counts, strict=True)]
    out: list[Source] = []
    for url in urls:
        count: int | None = None
        if local_path(url) is not None:
            try:
                count = count_samples(url)
            except (OSError, ValueError):
                count = None  # reading it later reports the problem as a BadImage
        out.append(InputShard(url, count))
    return out


# ------------------------------------------------------------------------------------------------------------
# HR images for tadm evaluate


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


class HRImages:
    """The resolved inputs of :func:`iter_hr_images`: an iterator that also knows how many images to expect.

    The progress bar gets the total through ``operator.length_hint``.
    """

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources
        counts = [1 if isinstance(s, InputFile) else s.count for s in sources]
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
            if isinstance(source, InputFile):
                try:
                    yield EvalImage(str(source.path), load_image(source.path))
                except ImageReadError as exc:
                    yield BadImage(str(source.path), str(exc))
            else:
                yield from _iter_shard_images(source.url)


def iter_hr_images(
    inputs: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None
) -> HRImages:
    """HR images from image files, folders (recursive), glob patterns and WebDataset shards.

    Inputs follow :func:`resolve_inputs` and are resolved now; unreadable images and damaged shards are
    yielded as :class:`BadImage` when reached.
    """
    return HRImages(resolve_inputs(inputs, shards=True, exclude=exclude))


def _iter_shard_images(url: str) -> Iterator[EvalImage | BadImage]:
    """Decode every sample of one shard; bad samples and a damaged shard become :class:`BadImage`.

    Read with the project's tar reader rather than ``webdataset.WebDataset``: WebDataset silently drops the
    rest of a truncated shard, which would shrink a test set without anyone noticing.
    """
    shard_errors: list[str] = []
    for _pos, key, fields in iter_shard(url, shard_errors.append):
        try:
            data, name = image_field(fields, url, key)
        except SampleError as exc:
            yield BadImage(f"{url}#{key}", str(exc))
            continue
        original = _original_path(fields, url, key)
        name = f"{url}#{original}" if original else name
        try:
            yield EvalImage(name, decode_image(data, name))
        except ImageReadError as exc:
            yield BadImage(name, str(exc))
    for message in shard_errors:
        yield BadImage(url, message)


def _original_path(fields: dict[str, bytes], url: str, key: str) -> str | None:
    """The source path ``tadm shard`` stored in the sample's ``.json`` (keys are sanitised, paths are not)."""
    try:
        path = sample_meta(fields, url, key).get("path")
    except SampleError:
        return None
    return path if isinstance(path, str) and path else None
