"""Held-out quality of a checkpoint through the real codec commands, next to bicubic.

    .venv/bin/python benchmarks/quality_cpu.py [--ckpt runs/quickstart/checkpoints/last.ckpt]
                                               [--images assets/samples/heldout]

Runs `tadm downscale` and `tadm upscale` (subprocesses, exactly what a user runs) on every image of a
held-out folder, then prints per image: PSNR-Y / SSIM-Y of the restored image and of bicubic down +
up at the same scale, and the PSNR of the model's 8-bit LR file against the bicubic LR image (a proper
small version of the photo stays >= 30 dB). Means and the number of images that beat bicubic come
last. The default images (assets/samples/heldout, see its LICENSES.md) are never trained on.

``--require`` checks targets and exits 1 naming each one missed (issue 24's for the shipped model:
``--require gain=1.5 share=0.9 worst=-0.3 lr_psnr=35``): mean PSNR-Y gain over bicubic, share of images
better than bicubic, the worst image's gain, and the lowest LR PSNR, all at least the given value.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def codec_round_trip(ckpt: Path, images: Path, work: Path, env: dict[str, str] | None = None) -> None:
    """`tadm downscale` of ``images`` into work/lr, then `tadm upscale` of those files into work/hr: the user's
    two commands as subprocesses (benchmarks/codec_time.py times the same)."""
    for verb, src, dst in (("downscale", images, work / "lr"), ("upscale", work / "lr", work / "hr")):
        cmd = [sys.executable, "-m", "tadm", verb, "--ckpt", str(ckpt), str(src), "--output", str(dst)]
        subprocess.run(
            [*cmd, "--overwrite", "--no-progress"], check=True, capture_output=True, text=True, env=env
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=REPO / "runs/quickstart/checkpoints/last.ckpt")
    ap.add_argument("--images", type=Path, default=REPO / "assets/samples/heldout")
    ap.add_argument("--work", type=Path, default=None, help="keep the LR and restored files here")
    ap.add_argument(
        "--require",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help=f"targets, each at least VALUE: {', '.join(TARGETS)} (exit 1 if one is missed)",
    )
    args = ap.parse_args()
    required = parse_targets(args.require, ap)

    from tadm.datamodules.image_io import list_images, load_image
    from tadm.evaluation.metrics import psnr_rgb, psnr_y, ssim_y
    from tadm.inference.lr_files import read_lr
    from tadm.inference.pipeline import bicubic_round_trip
    from tadm.ops.images import bicubic_down, pad_to_multiple

    work = args.work or Path(tempfile.mkdtemp(prefix="tadm-quality-"))
    start = time.perf_counter()
    codec_round_trip(args.ckpt, args.images, work)
    seconds = time.perf_counter() - start

    rows = []
    for path in list_images(args.images):
        x = load_image(path)[None]
        name = path.relative_to(args.images).with_suffix("")
        y, meta = read_lr(work / "lr" / f"{name}.png")
        restored = load_image(work / "hr" / f"{name}.png")[None]
        scale = meta.scale if meta is not None else 16
        base = bicubic_round_trip(x, scale)
        xp, _ = pad_to_multiple(x, scale)
        lr_ref = bicubic_down(xp, scale)
        rows.append(
            (
                str(name),
                f"{x.shape[-1]}x{x.shape[-2]}",
                float(psnr_y(restored, x)),
                float(psnr_y(base, x)),
                float(ssim_y(restored, x)),
                float(ssim_y(base, x)),
                float(psnr_rgb(y[..., : lr_ref.shape[-2], : lr_ref.shape[-1]], lr_ref)),
            )
        )

    print(
        f"checkpoint {args.ckpt} on {len(rows)} held-out image(s) from {args.images} (torch {torch.__version__})"
    )
    print(
        f"{'image':<18}{'size':>10}{'PSNR-Y':>9}{'bicubic':>9}{'gain':>7}{'SSIM-Y':>8}{'bicubic':>9}{'LR PSNR':>9}"
    )
    for name, size, p, pb, s, sb, lr in rows:
        print(f"{name:<18}{size:>10}{p:>9.2f}{pb:>9.2f}{p - pb:>+7.2f}{s:>8.4f}{sb:>9.4f}{lr:>9.2f}")
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(2, 7)]
    wins = sum(r[2] > r[3] for r in rows)
    worst = min(rows, key=lambda r: r[2] - r[3])
    measured = {  # the summary line's numbers, which --require checks
        "gain": mean[0] - mean[1],
        "share": wins / n,
        "worst": worst[2] - worst[3],
        "lr_psnr": min(r[6] for r in rows),
    }
    print(
        f"{'mean':<18}{'':>10}{mean[0]:>9.2f}{mean[1]:>9.2f}{measured['gain']:>+7.2f}"
        f"{mean[2]:>8.4f}{mean[3]:>9.4f}{mean[4]:>9.2f}"
    )
    print(
        f"beats bicubic (PSNR-Y) on {wins} of {n} images; worst: {worst[0]} ({measured['worst']:+.2f} dB); "
        f"lowest LR PSNR {measured['lr_psnr']:.2f} dB; downscale + upscale took {seconds:.1f} s"
    )
    missed = missed_targets(measured, required)
    for line in missed:
        print(f"target missed: {line}")
    return 1 if missed else 0


#: what --require can name: the summary line's numbers
TARGETS = ("gain", "share", "worst", "lr_psnr")


def missed_targets(measured: dict[str, float], required: dict[str, float]) -> list[str]:
    """One line per target the measured numbers fall short of (NaN misses every target)."""
    return [f"{k} {measured[k]:.3f} < {v:g}" for k, v in required.items() if not measured[k] >= v]


def parse_targets(items: list[str], ap: argparse.ArgumentParser) -> dict[str, float]:
    """``["gain=1.5", ...]`` -> ``{"gain": 1.5}``; anything else is a usage error naming the item."""
    targets: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            if name not in TARGETS:
                raise ValueError
            targets[name] = float(value)
        except ValueError:
            ap.error(f"--require {item!r}: expected NAME=NUMBER with NAME one of {', '.join(TARGETS)}")
    return targets


if __name__ == "__main__":
    sys.exit(main())
