"""Command inputs: image files, folders (recursive) and glob patterns -> the files to process, each with
the output name it gets (its path relative to the folder it was found in, without suffix)."""

from __future__ import annotations

import glob
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tadm.datamodules.image_io import IMAGE_EXTENSIONS
from tadm.errors import InputError


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
