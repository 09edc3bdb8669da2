"""IRN at x16 after a short CPU fit, through the real commands, next to bicubic on held-out photos.

    .venv/bin/python benchmarks/irn_fit.py [--steps 1500] [--couplings 0,0,1,1] [--growth 16]
                                           [--z-temperature 0] [--crop 64] [--batch 16] [--lr 1e-3]

Runs ``tadm fit --config configs/experiments/irn_x16.yaml`` (IRN's own recipe: its three losses, Adam,
its gradient clipping) with a CPU-sized override written beside the run: a slim network (couplings per x2
stage, dense-block growth), 64-px crops of the six bundled training photos, ``--steps`` optimiser steps
under a warm-up + cosine schedule, and IRN's clip of 10 on its per-image sums rescaled to tadm's per-pixel
means (10 / (3 crop^2)). Then ``benchmarks/quality_cpu.py`` runs ``tadm downscale`` / ``tadm upscale`` on
the 13 held-out photos (assets/samples/heldout, never trained on) and prints PSNR-Y / SSIM-Y per photo
next to bicubic down + up.

``--z-temperature`` is the standard deviation of IRN's high-frequency draw, in training and when
upscaling: IRN's own is 1; 0 is the deterministic variant (z = 0). A short fit cannot yet teach the
couplings to shrink an N(0, 1) draw below the image's own detail (IRN trains 500k steps), so at 1 the
draw swamps the image; benchmarks/README.md "IRN x16 short fit" has both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def override(args: argparse.Namespace, work: Path) -> dict:
    """The CPU-sized changes to configs/experiments/irn_x16.yaml (a second --config replaces these keys)."""
    clip = 10.0 / (3 * args.crop * args.crop)  # IRN's 10 on per-image sums, on tadm's per-pixel means
    return {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": args.steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": clip,
            "log_every_n_steps": 50,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(work), "name": "irn_x16_cpu"},
            },
            "callbacks": [
                {
                    "class_path": "tadm.training.callbacks.RunCheckpoint",
                    "init_args": {"save_last": True, "enable_version_counter": False},
                }
            ],
        },
        "model": {
            "rescaler": {
                "class_path": "irn",
                "init_args": {
                    "num_couplings": [int(c) for c in args.couplings.split(",")],
                    "coupling_growth": args.growth,
                    "z_temperature": args.z_temperature,
                },
            },
            "optimizer": {
                "class_path": "torch.optim.Adam",
                "init_args": {"lr": args.lr, "betas": [0.9, 0.999]},
            },
            "lr_scheduler": {
                "class_path": "tadm.training.schedules.WarmupCosineLR",
                "init_args": {"warmup_steps": max(1, args.steps // 20)},
            },
        },
        "data": {
            "class_path": "ImageFolderDataModule",
            "init_args": {
                "train_dir": str(REPO / "assets/samples/train"),
                "val_dir": str(REPO / "assets/samples/val"),
                "crop_size": args.crop,
                "batch_size": args.batch,
                "train_repeats": 200,
                "num_workers": 0,
                "cache_images": True,
            },
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument(
        "--couplings", default="0,0,1,1", help="affine couplings per x2 stage, full resolution first"
    )
    ap.add_argument("--growth", type=int, default=16, help="dense-block growth (IRN: 32)")
    ap.add_argument("--z-temperature", type=float, default=0.0, help="IRN's draw: 1; 0 = deterministic")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=Path, default=REPO / "assets/samples/heldout")
    ap.add_argument("--work", type=Path, default=None, help="keep the run here (default: a temp folder)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tadm-irn-fit-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = work / "cpu_fit.yaml"
    extra.write_text(yaml.safe_dump(override(args, work), sort_keys=False))
    fit = [
        *(sys.executable, "-m", "tadm", "fit"),
        *("--config", str(REPO / "configs/experiments/irn_x16.yaml"), "--config", str(extra)),
    ]
    print(f"IRN x16: couplings {args.couplings}, growth {args.growth}, z_temperature {args.z_temperature}, "
          f"{args.steps} steps of {args.batch} x {args.crop}-px crops, Adam lr {args.lr}, seed {args.seed}")  # fmt: skip
    start = time.perf_counter()
    subprocess.run(fit, check=True, cwd=REPO)
    print(f"fit took {time.perf_counter() - start:.0f} s", flush=True)
    ckpt = work / "irn_x16_cpu" / "checkpoints" / "last.ckpt"
    quality = [sys.executable, str(REPO / "benchmarks/quality_cpu.py"), "--ckpt", str(ckpt)]
    subprocess.run([*quality, "--images", str(args.images), "--work", str(work / "codec")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
