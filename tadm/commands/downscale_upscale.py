"""``tadm downscale`` and ``tadm upscale``: a trained model as an HR -> 8-bit LR -> HR codec.

    tadm downscale --ckpt C photos/ more/*.jpg --output lr/
    tadm upscale   --ckpt C lr/ --output restored/

Inputs are files, folders (recursive) and glob patterns; outputs keep each file's path relative to
the folder it was found in. Every output is written atomically; existing outputs are skipped unless
``--overwrite``, so an interrupted run is finished by running it again. Without ``--overwrite`` no file
is ever replaced: an output another run finishes while this one works on it is kept and counted as
skipped (the final step refuses a taken name). A bad file is reported and the rest are processed; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tadm.commands.common import (
    ITEM_ERRORS,
    Outcome,
    add_batch_size_argument,
    add_color_fix_argument,
    add_model_arguments,
    command,
    each_alone,
    for_each_batch,
    load_from_args,
    size_batches,
    writable_folder,
)
from tadm.datamodules.inputs import InputFile, collect_inputs
from tadm.inference.codec import BYTES_PER_HR_PIXEL, DEFAULT_MAX_HR_MEGAPIXELS, DEFAULT_MAX_HR_SIDE
from tadm.ops.files import DestinationExists

if TYPE_CHECKING:
    from torch import Tensor


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    add_model_arguments(ap)
    add_batch_size_argument(ap)
    ap.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    return ap


#: an input that is to be processed, and where its output goes
Job = tuple[InputFile, Path]
T = TypeVar("T")


def _run_codec(
    args: argparse.Namespace,
    files: list[InputFile],
    verb: str,
    write: Callable[[InputFile, Path], None],
    *,
    key: Callable[[InputFile], Hashable | None] | None = None,
    max_items: Callable[[InputFile], int] | None = None,
    write_batch: Callable[[Sequence[Job]], Sequence[Outcome]] | None = None,
) -> int:
    """Write each input whose output is not there yet (or all, with --overwrite), ``--batch-size`` at a time.

    ``write(input, destination)`` writes one; ``write_batch(jobs)`` writes inputs of one ``key`` (their size)
    together, returning one outcome per job. The early check saves the work; the writers must still refuse a
    taken name at their final step (another run may have written it since): :class:`DestinationExists` counts
    as skipped, like the early check.
    """

    def process(batch: Sequence[InputFile]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        jobs: list[Job] = []
        for i, f in enumerate(batch):
            # not with_suffix: "a.v2.jpg" -> "a.v2.png"
            dest = args.output / f.rel.parent / f"{f.rel.name}.png"
            if dest.exists() and not args.overwrite:
                outcomes[i] = False
            else:
                jobs.append((f, dest))
        done = iter(_write_jobs(jobs, write, write_batch))
        return [outcomes[i] if i in outcomes else next(done) for i in range(len(batch))]

    batches = size_batches(files, key or (lambda f: None), args.batch_size, max_items)
    report = for_each_batch(batches, process, lambda f: str(f.path), verb, len(files), not args.no_progress)
    print(report.summary(f"{verb}d"))
    return report.exit_code


def _write_jobs(
    jobs: Sequence[Job],
    write: Callable[[InputFile, Path], None],
    write_batch: Callable[[Sequence[Job]], Sequence[Outcome]] | None,
) -> list[Outcome]:
    if write_batch is not None and len(jobs) > 1:
        return list(write_batch(jobs))
    return [_written(lambda f=f, dest=dest: write(f, dest)) for f, dest in jobs]  # type: ignore[misc]


def _groups(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """Decoded inputs in groups that stack into one tensor (their headers agreed; the pixels must too)."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _written(write: Callable[[], object]) -> Outcome:
    """One output: True once written, False when another run wrote it first, or its own error."""
    try:
        write()
    except DestinationExists:
        return False  # another run finished this output meanwhile: its file is kept
    except ITEM_ERRORS as err:
        return err
    return True


def _positive_megapixels(text: str) -> float:
    """``--max-hr-megapixels``: a number above 0 (``inf``: no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of megapixels above 0, got {text!r}")
    return value


def _header_size(f: InputFile) -> tuple[int, int] | None:
    """(H, W) of an input from its header, for grouping; None when unreadable (its own batch reports it)."""
    from tadm.datamodules.image_io import image_size

    try:
        return image_size(f.path)
    except ITEM_ERRORS:
        return None


@command("tadm downscale")
def downscale_command(argv: Sequence[str]) -> int:
    """HR images -> 8-bit LR PNGs (with HR size, scale and checkpoint ids as PNG metadata)."""
    args = _parser("tadm downscale", downscale_command.__doc__ or "").parse_args(list(argv))
    import torch

    from tadm.datamodules.image_io import load_image
    from tadm.inference.lr_files import LRMeta, write_lr

    files = collect_inputs(
        args.inputs, exclude=args.output
    )  # bad inputs and outputs fail before the model loads
    writable_folder(args.output)
    codec = load_from_args(args)

    def write(f: InputFile, dest: Path) -> None:
        y, (h, w) = codec.downscale(load_image(f.path)[None])
        meta = LRMeta(h, w, codec.scale, codec.rescaler_id, codec.model_id)
        write_lr(dest, y, meta, overwrite=args.overwrite)

    def write_batch(jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: dict[Path, Outcome] = {}
        ready: list[tuple[Path, Tensor]] = []
        for f, dest in jobs:
            try:
                ready.append((dest, load_image(f.path)[None]))
            except ITEM_ERRORS as err:
                outcomes[dest] = err

        def run(part: Sequence[tuple[Path, Tensor]]) -> list[Outcome]:
            y, (h, w) = codec.downscale(torch.cat([x for _, x in part]))
            meta = LRMeta(h, w, codec.scale, codec.rescaler_id, codec.model_id)
            return [
                _written(lambda i=i, d=d: write_lr(d, y[i : i + 1], meta, overwrite=args.overwrite))  # type: ignore[misc]
                for i, (d, _) in enumerate(part)
            ]

        for part in _groups(ready, lambda r: tuple(r[1].shape)):
            outcomes.update(zip([d for d, _ in part], each_alone(part, run), strict=True))
        return [outcomes[dest] for _, dest in jobs]

    return _run_codec(args, files, "downscale", write, key=_header_size, write_batch=write_batch)


@command("tadm upscale")
def upscale_command(argv: Sequence[str]) -> int:
    """LR PNGs -> HR images at their original size (read from the PNG metadata)."""
    ap = _parser("tadm upscale", upscale_command.__doc__ or "")
    ap.add_argument("--save-timesteps", action="store_true", help="also write NAME.timesteps.png heat maps")
    add_color_fix_argument(ap)
    ap.add_argument(
        "--max-hr-side",
        type=int,
        default=DEFAULT_MAX_HR_SIDE,
        help="refuse an input without tadm metadata whose restored longer side would pass this "
        f"(it is probably a full-size photo, not an LR file; default {DEFAULT_MAX_HR_SIDE})",
    )
    ap.add_argument(
        "--max-hr-megapixels",
        type=_positive_megapixels,
        default=DEFAULT_MAX_HR_MEGAPIXELS,
        help="refuse an input whose restored image would pass this many megapixels: an upscale takes about "
        f"{BYTES_PER_HR_PIXEL} bytes of memory per output pixel besides the model (default "
        f"{DEFAULT_MAX_HR_MEGAPIXELS}, about {DEFAULT_MAX_HR_MEGAPIXELS * BYTES_PER_HR_PIXEL / 1e3:.1f} GB; "
        "a batch stays within it too)",
    )
    args = ap.parse_args(list(argv))
    import torch

    from tadm.inference.heatmap import timestep_panel
    from tadm.inference.lr_files import LRHeader, read_lr, read_lr_header, write_png

    files = collect_inputs(args.inputs, exclude=args.output)
    writable_folder(args.output)
    codec = load_from_args(args)
    model = codec.module

    def write_outputs(dest: Path, image: Tensor, timesteps: Tensor | None, size: tuple[int, int]) -> None:
        if args.save_timesteps and timesteps is not None and model.aligner is not None:
            factor = model.backbone.downsample_factor
            heat = timestep_panel(timesteps, factor, size, model.aligner.t_min, model.aligner.t_max)
            # before the image, so a run stopped between the two is completed by the next one; a heat map
            # left by an earlier or concurrent run of this input is kept
            with contextlib.suppress(DestinationExists):
                write_png(dest.with_suffix(".timesteps.png"), heat * 2 - 1, overwrite=args.overwrite)
        write_png(dest, image, overwrite=args.overwrite)

    def checked(f: InputFile) -> tuple[Tensor, tuple[int, int]]:
        y, meta = read_lr(f.path)
        size = codec.target_size(
            y, meta, str(f.path), max_hr_side=args.max_hr_side, max_hr_megapixels=args.max_hr_megapixels
        )
        return y, size

    def write(f: InputFile, dest: Path) -> None:
        y, size = checked(f)
        out = codec.upscale(y, size)
        write_outputs(dest, out.image, out.timesteps, size)

    def write_batch(jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: dict[Path, Outcome] = {}
        ready: list[tuple[Path, Tensor, tuple[int, int]]] = []
        for f, dest in jobs:
            try:
                ready.append((dest, *checked(f)))
            except ITEM_ERRORS as err:
                outcomes[dest] = err

        def run(part: Sequence[tuple[Path, Tensor, tuple[int, int]]]) -> list[Outcome]:
            size = part[0][2]
            out = codec.upscale(torch.cat([y for _, y, _ in part]), size)
            t = out.timesteps
            return [
                _written(
                    lambda i=i, d=d: write_outputs(  # type: ignore[misc]
                        d, out.image[i : i + 1], None if t is None else t[i : i + 1], size
                    )
                )
                for i, (d, _, _) in enumerate(part)
            ]

        for part in _groups(ready, lambda r: (tuple(r[1].shape), r[2])):
            outcomes.update(zip([d for d, _, _ in part], each_alone(part, run), strict=True))
        return [outcomes[dest] for _, dest in jobs]

    headers: dict[Path, LRHeader | None] = {}

    def header(f: InputFile) -> LRHeader | None:
        if f.path not in headers:
            headers[f.path] = read_lr_header(f.path, codec.scale)
        return headers[f.path]

    def key(f: InputFile) -> Hashable | None:
        h = header(f)
        return None if h is None else (h.lr_size, h.hr_size)

    def max_items(f: InputFile) -> int:
        """As many files of this size as the memory limit allows together (each one is checked alone too)."""
        h = header(f)
        pixels = 0 if h is None else h.lr_size[0] * h.lr_size[1] * codec.scale**2
        if not pixels or math.isinf(args.max_hr_megapixels):
            return args.batch_size
        return int(args.max_hr_megapixels * 1e6 // pixels)

    return _run_codec(args, files, "upscale", write, key=key, max_items=max_items, write_batch=write_batch)
