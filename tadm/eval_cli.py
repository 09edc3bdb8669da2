"""``tadm test``: paper-style metrics for any checkpoint on any folder of HR images (or shards).

    tadm test --ckpt C data/DIV2K_valid_HR --output reports/div2k_x16

Each HR image goes HR -> 8-bit LR -> HR through the checkpoint (tiled like ``tadm upscale``) and,
for reference, through bicubic down + bicubic up at the same scale. Writes ``per_image.csv`` and
``summary.md`` (printed too). A bad file is reported, the rest evaluated, and the exit status is 1.
(``tadm test --config ...`` still runs LightningCLI's test loop on a data module.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def _parser() -> argparse.ArgumentParser:
    from tadm.codec_cli import add_model_arguments

    ap = argparse.ArgumentParser(prog="tadm test", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="HR image files, folders, glob patterns or .tar shards")
    add_model_arguments(ap)
    ap.add_argument(
        "--output", "-o", required=True, type=Path, help="folder for per_image.csv and summary.md"
    )
    ap.add_argument(
        "--no-perceptual", action="store_true", help="skip LPIPS and DISTS (no VGG weights needed)"
    )
    ap.add_argument("--no-fid", action="store_true", help="skip FID")
    ap.add_argument(
        "--perceptual-random-backbone",
        action="store_true",
        help="LPIPS/DISTS on a random VGG: for tests only, the numbers are not perceptual measures",
    )
    ap.add_argument("--no-bicubic", action="store_true", help="omit the bicubic reference row")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def test_command(argv: Sequence[str]) -> int:
    """Evaluate a checkpoint: per-image CSV and a Markdown summary with a bicubic reference row."""
    args = _parser().parse_args(list(argv))
    from tadm import pipeline
    from tadm.checkpoint_io import CheckpointError
    from tadm.codec_cli import load_from_args
    from tadm.evaluation import Metrics, evaluate, iter_hr_images

    try:
        images = iter_hr_images(args.inputs)
        codec = load_from_args(args)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = Metrics(
        device=codec.device,
        perceptual=not args.no_perceptual,
        fid=not args.no_fid,
        random_backbone=args.perceptual_random_backbone,
    )
    if args.no_perceptual:
        metrics.not_computed.update({"LPIPS": "--no-perceptual", "DISTS": "--no-perceptual"})
    if args.no_fid:
        metrics.not_computed["FID"] = "--no-fid"
    m = codec.module

    def model(x: Tensor) -> Tensor:
        return codec.round_trip(x).reconstruction

    def bicubic(x: Tensor) -> Tensor:
        return pipeline.round_trip(m.backbone, m.baseline, x).reconstruction

    name = f"tadm {Path(args.ckpt).name} [{codec.model_id[:8]}]"
    methods = {name: model} if args.no_bicubic else {name: model, f"bicubic x{codec.scale}": bicubic}
    _warm_up(codec)
    report = evaluate(images, methods, metrics, progress=not args.no_progress)
    markdown = report.write(args.output)
    print(markdown)
    print(f"wrote {args.output / 'per_image.csv'} and {args.output / 'summary.md'}")
    return 1 if report.failed else 0


def _warm_up(codec) -> None:  # type: ignore[no-untyped-def]
    """One small round trip first, so the first image's time excludes one-off setup (kernels, compile)."""
    k = codec.pad_multiple * 2
    with torch.no_grad():
        codec.round_trip(torch.zeros(1, 3, k, k, device=codec.device))


# pytest would otherwise collect this module-level name when imported in tests
test_command.__test__ = False  # type: ignore[attr-defined]
