"""``tadm evaluate``: paper-style metrics for any checkpoint on any folder of HR images (or shards).

    tadm evaluate --ckpt C data/DIV2K_valid_HR --output reports/div2k_x16

Each HR image goes HR -> 8-bit LR -> HR through the checkpoint (tiled like ``tadm upscale``) and,
for reference, through bicubic down + bicubic up at the same scale. Writes ``per_image.csv``, ``summary.md``
(printed too) and ``summary.json``. ``--protocol`` picks how PSNR-Y / SSIM-Y are computed
(:mod:`tadm.evaluation.protocols`): ``pyiqa`` as in the TADM paper, ``basicsr`` as in IRN; ``--color-fix``
corrects the checkpoint's reconstructions (the bicubic row is its own reference), and the report records it.
``--batch-size N`` runs the round trips of up to N same-size images together (a GPU's throughput; the report is
batch size 1's but for the timings). A bad file is reported, the rest evaluated, and the exit status is 1. A
report already in ``--output`` is refused before any work unless ``--overwrite``. (``tadm test --config ...`` is LightningCLI's test loop on a data module.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from tadm.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_batch_size_argument,
    add_color_fix_argument,
    add_model_arguments,
    command,
    error_line,
    for_each,
    load_from_args,
    writable_folder,
)
from tadm.errors import InputError
from tadm.ops.files import DestinationExists


def _parser() -> argparse.ArgumentParser:
    from tadm.evaluation.protocols import PROTOCOLS

    ap = argparse.ArgumentParser(prog="tadm evaluate", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="HR image files, folders, glob patterns or .tar shards")
    add_model_arguments(ap)
    add_batch_size_argument(ap)
    ap.add_argument(
        "--output",
        "-o",
        required=True,
        type=Path,
        help="folder for per_image.csv, summary.md and summary.json",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a report already in --output (default: refuse before any work)",
    )
    ap.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="tadm",
        help="how PSNR-Y/SSIM-Y are computed: tadm (default: torchmetrics, full image), pyiqa (pyiqa's psnr/ssim "
        "on YCbCr's Y, no border crop: the TADM paper's table), basicsr (BasicSR's, border crop = scale, "
        "MATLAB-style SSIM: IRN's tables); recorded in the report",
    )
    add_color_fix_argument(ap)
    ap.add_argument(
        "--no-perceptual", action="store_true", help="skip LPIPS and DISTS (no VGG weights needed)"
    )
    ap.add_argument("--no-fid", action="store_true", help="skip FID and KID")
    ap.add_argument("--no-bicubic", action="store_true", help="omit the bicubic reference row")
    return ap


@command("tadm evaluate")
def evaluate_command(argv: Sequence[str]) -> int:
    """Evaluate a checkpoint: per-image CSV and a Markdown summary with a bicubic reference row."""
    args = _parser().parse_args(list(argv))
    from tadm.datamodules.inputs import iter_hr_images
    from tadm.evaluation.engine import Evaluation, Metrics
    from tadm.evaluation.perceptual import vgg16_weights_path
    from tadm.evaluation.protocols import get_protocol

    images = iter_hr_images(args.inputs, exclude=args.output)
    writable_folder(args.output)
    _check_no_report(args.output, args.overwrite)
    codec = load_from_args(args)
    protocol = get_protocol(args.protocol, codec.scale)
    fid = not args.no_fid
    try:
        metrics = Metrics(codec.device, perceptual=not args.no_perceptual, fid=fid, protocol=protocol)
    except FileNotFoundError as err:  # no VGG16 weights: PSNR/SSIM (and FID) still mean something
        print(
            f"warning: LPIPS/DISTS not computed: {error_line(err)} (--no-perceptual skips them)",
            file=sys.stderr,
        )
        metrics = Metrics(codec.device, perceptual=False, fid=fid, protocol=protocol)
        metrics.not_computed["LPIPS/DISTS"] = f"VGG16 weights missing at {vgg16_weights_path()}"
    if args.no_perceptual:
        metrics.not_computed.update({"LPIPS": "--no-perceptual", "DISTS": "--no-perceptual"})
    if args.no_fid:
        metrics.not_computed["FID/KID"] = "--no-fid"

    def model(x: Tensor) -> tuple[Tensor, Tensor]:
        trip = codec.round_trip(x)
        return trip.reconstruction, trip.lr  # the LR image too: the report gives its PNG size (lr_bpp)

    def bicubic(x: Tensor) -> tuple[Tensor, Tensor]:
        return bicubic_with_lr(x, codec.scale)

    name = f"tadm {Path(args.ckpt).name} [{codec.model_id[:8]}]"
    methods = {name: model} if args.no_bicubic else {name: model, f"bicubic x{codec.scale}": bicubic}
    _warm_up(codec)
    evaluation = Evaluation(methods, metrics, color_fix=codec.color_fix, batch_size=args.batch_size)
    for_each(images, evaluation.add, lambda item: item.path, "evaluate", images.total, not args.no_progress)
    report = evaluation.finish()
    report.model = _model_facts(args.ckpt, codec)
    try:
        markdown = report.write(args.output, overwrite=args.overwrite)
    except OSError as err:  # the results are computed: show them even when they cannot be saved
        print(report.markdown())
        if isinstance(err, DestinationExists):
            why = f"'{err.filename}' was written by another run meanwhile and is kept (--overwrite replaces)"
        else:
            why = error_line(err)  # names the report file (OutputWriteError)
        print(f"error: the report was not saved: {why}", file=sys.stderr)
        return EXIT_FAILED
    print(markdown)
    print(f"wrote per_image.csv, summary.md and summary.json to {args.output}")
    return EXIT_FAILED if report.failed else EXIT_OK


def _check_no_report(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an earlier run's report (``--overwrite`` allows it)."""
    from tadm.evaluation.report import existing_report_file

    existing = None if overwrite else existing_report_file(output)
    if existing is not None:
        raise InputError(
            f"'{existing}' exists (an earlier report): --overwrite replaces it, or choose another --output"
        )


def bicubic_with_lr(x: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """``tadm.inference.pipeline.bicubic_round_trip`` (the same arithmetic; a test checks it), keeping its
    8-bit LR image for the report's ``lr_bpp``."""
    from tadm.contracts import quantize_8bit
    from tadm.ops.images import bicubic_down, bicubic_resize, crop_to, pad_to_multiple

    xp, size = pad_to_multiple(x.float(), scale)
    y = quantize_8bit(bicubic_down(xp, scale), training=False)
    return crop_to(bicubic_resize(y, (xp.shape[-2], xp.shape[-1])), size), y


def _model_facts(ckpt: str, codec) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What ``summary.json`` says about the model (``tadm compare`` shows the trainable parameters)."""
    module = codec.module
    return {
        "checkpoint": os.path.abspath(ckpt),  # tadm compare finds its config.yaml from anywhere
        "model_id": codec.model_id,
        "scale": codec.scale,
        "stage": str(getattr(module, "stage", "")),
        "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
    }


def _warm_up(codec) -> None:  # type: ignore[no-untyped-def]
    """One small round trip first, so the first image's time excludes one-off setup (kernels, compile)."""
    k = codec.pad_multiple * 2
    with torch.no_grad():
        codec.round_trip(torch.zeros(1, 3, k, k, device=codec.device))
