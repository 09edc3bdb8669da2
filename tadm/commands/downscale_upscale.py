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
from collections.abc import Callable, Sequence
from pathlib import Path

from tadm.commands.common import (
    add_color_fix_argument,
    add_model_arguments,
    command,
    for_each,
    load_from_args,
    writable_folder,
)
from tadm.datamodules.inputs import InputFile, collect_inputs
from tadm.inference.codec import BYTES_PER_HR_PIXEL, DEFAULT_MAX_HR_MEGAPIXELS, DEFAULT_MAX_HR_SIDE
from tadm.ops.files import DestinationExists


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    add_model_arguments(ap)
    ap.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    return ap


def _run_codec(
    args: argparse.Namespace, files: list[InputFile], verb: str, write: Callable[[InputFile, Path], None]
) -> int:
    """``write(input, destination)`` each input whose output is not there yet (or all, with --overwrite).

    The early check saves the work; ``write`` must still refuse a taken name at its final step (it may have
    been written by another run since): :class:`DestinationExists` counts as skipped, like the early check.
    """

    def process(f: InputFile) -> bool:
        dest = args.output / f.rel.parent / f"{f.rel.name}.png"  # not with_suffix: "a.v2.jpg" -> "a.v2.png"
        if dest.exists() and not args.overwrite:
            return False
        try:
            write(f, dest)
        except DestinationExists:
            return False  # another run finished this output meanwhile: its file is kept
        return True

    report = for_each(files, process, lambda f: str(f.path), verb, len(files), not args.no_progress)
    print(report.summary(f"{verb}d"))
    return report.exit_code


def _positive_megapixels(text: str) -> float:
    """``--max-hr-megapixels``: a number above 0 (``inf``: no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of megapixels above 0, got {text!r}")
    return value


@command("tadm downscale")
def downscale_command(argv: Sequence[str]) -> int:
    """HR images -> 8-bit LR PNGs (with HR size, scale and checkpoint ids as PNG metadata)."""
    args = _parser("tadm downscale", downscale_command.__doc__ or "").parse_args(list(argv))
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

    return _run_codec(args, files, "downscale", write)


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
        f"{DEFAULT_MAX_HR_MEGAPIXELS}, about {DEFAULT_MAX_HR_MEGAPIXELS * BYTES_PER_HR_PIXEL / 1e3:.1f} GB)",
    )
    args = ap.parse_args(list(argv))
    from tadm.inference.heatmap import timestep_panel
    from tadm.inference.lr_files import read_lr, write_png

    files = collect_inputs(args.inputs, exclude=args.output)
    writable_folder(args.output)
    codec = load_from_args(args)
    model = codec.module

    def write(f: InputFile, dest: Path) -> None:
        y, meta = read_lr(f.path)
        size = codec.target_size(
            y, meta, str(f.path), max_hr_side=args.max_hr_side, max_hr_megapixels=args.max_hr_megapixels
        )
        out = codec.upscale(y, size)
        if args.save_timesteps and out.timesteps is not None and model.aligner is not None:
            factor = model.backbone.downsample_factor
            heat = timestep_panel(out.timesteps, factor, size, model.aligner.t_min, model.aligner.t_max)
            # before the image, so a run stopped between the two is completed by the next one; a heat map
            # left by an earlier or concurrent run of this input is kept
            with contextlib.suppress(DestinationExists):
                write_png(dest.with_suffix(".timesteps.png"), heat * 2 - 1, overwrite=args.overwrite)
        write_png(dest, out.image, overwrite=args.overwrite)

    return _run_codec(args, files, "upscale", write)
