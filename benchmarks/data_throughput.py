"""Training-data throughput (512x512 crops from ~2K JPEG/PNG photos) and the stage-1 step with cached latents.

    .venv/bin/python benchmarks/data_throughput.py [--photos 12] [--samples 64] [--workers 0] [--step-repeats 2]

1. Makes ``--photos`` 2048x1365 photos (the bundled samples, resized, with sensor-like noise; JPEG q92 and
   PNG alternating), packs them with ``tadm shard`` (plain, and with cached latents), and reports
   samples/s of 512x512 training crops for: the image folder, the shards, the shards with cached latents,
   each with 1 and 4 crops per decoded photo where the data module offers it. The latents are made with
   the tiny random SD VAE (the same 4x64x64 fp16 latent per crop as the full-size one: the values do not
   matter for throughput).
2. Times one stage-1 training step (paper-size DFRM, x16, one 512x512 crop) on the full-size SD VAE
   architecture with random weights: with a cached latent versus encoding on the fly.

Prints a table; nothing is asserted. Ratios within one run are the meaningful figures.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from tadm.datamodules.image_folder import ImageFolderDataModule
from tadm.datamodules.shard_writer import LatentOptions, pack_shards
from tadm.datamodules.webdataset import WebDatasetDataModule
from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE
from tadm.testing.twins.unet_twins import StableDiffusionTwin

REPO = Path(__file__).resolve().parents[1]
SIZE = (2048, 1365)  # "2K" photo, 3:2
CROP = 512
#: diffusers' AutoencoderKL as in Stable Diffusion 1.x/2.x (83.7 M parameters)
SD_VAE = {**FULL_SIZE_VAE, "scaling_factor": 0.18215}


def make_photos(folder: Path, count: int) -> None:
    """``count`` 2K photos from the bundled samples: resized, with noise so they compress like photos."""
    sources = sorted((REPO / "assets" / "samples").rglob("*.png")) + sorted(
        (REPO / "assets" / "samples").rglob("*.jpg")
    )
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as im:
            photo = ImageOps.fit(im.convert("RGB"), SIZE, Image.BICUBIC)
        noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, 3.0, (SIZE[1], SIZE[0], 3))
        photo = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if i % 2:
            photo.save(folder / f"photo_{i:03d}.jpg", quality=92)
        else:
            photo.save(folder / f"photo_{i:03d}.png")


def samples_per_second(batches: Iterable[dict[str, Any]], samples: int) -> float:
    """Samples/s after the first batch (worker start-up and shuffle-buffer fill are not counted)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += len(batch["image"])
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def data_rows(root: Path, samples: int, batch: int, workers: int, photos: int) -> list[tuple[str, float]]:
    per_epoch = samples + 2 * batch
    rows = []
    folder = ImageFolderDataModule(
        train_dir=str(root / "photos"),
        crop_size=CROP,
        batch_size=batch,
        num_workers=workers,
        train_repeats=math.ceil(per_epoch / photos),
    )
    folder.setup("fit")
    rows.append(("image folder (decode per crop)", samples_per_second(folder.train_dataloader(), samples)))
    variants: list[tuple[str, Path, dict[str, Any]]] = [
        ("shards, 1 crop per decoded photo", root / "shards", {"crops_per_image": 1}),
        ("shards, 4 crops per decoded photo", root / "shards", {"crops_per_image": 4}),
        ("shards + cached latents, 1 crop per photo", root / "latent_shards", {"crops_per_image": 1}),
        ("shards + cached latents, 4 crops per photo", root / "latent_shards", {"crops_per_image": 4}),
    ]
    for name, shards, kwargs in variants:
        dm = WebDatasetDataModule(
            train_shards=str(shards),
            crop_size=CROP,
            batch_size=batch,
            num_workers=workers,
            samples_per_epoch=per_epoch,
            shuffle_buffer=8,
            latents="latent" in name,
            **kwargs,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        if "latent" in name:
            first = next(iter(loader))
            assert first["latent"].shape == (batch, 4, CROP // 8, CROP // 8)
        rows.append((name, samples_per_second(loader, samples)))
    return rows


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def step_rows(repeats: int) -> list[tuple[str, float]]:
    """One stage-1 step (forward, backward, AdamW) with a cached latent vs encoding the crop first."""
    from diffusers import AutoencoderKL

    from tadm.components.rescalers.dfrm import DFRM
    from tadm.training.lightning_module import TADMModule
    from tadm.training.losses import weighted_sum

    torch.manual_seed(0)
    backbone = StableDiffusionTwin("tiny-sd15")
    backbone.vae = AutoencoderKL(**SD_VAE).eval().requires_grad_(False)  # full-size architecture, random
    module = TADMModule(backbone=backbone, rescaler=DFRM(scale=16), scale=16)
    module.configure_model()
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    x = torch.rand(1, 3, CROP, CROP) * 2 - 1
    with torch.no_grad():
        cached = {"image": x, "latent": backbone.encode(x).half()}
    fresh = {"image": x}

    def step(batch: dict[str, Any]) -> None:
        opt.zero_grad(set_to_none=True)
        terms = module.rescaler.training_losses(batch["image"], module._latent(batch), module.distance)
        weighted_sum(terms, module.loss_weights).backward()
        opt.step()

    encode = _timed(lambda: backbone.encode(x), repeats)
    with_cache = _timed(lambda: step(cached), repeats)
    on_the_fly = _timed(lambda: step(fresh), repeats)
    return [
        ("VAE encode only (no grad)", encode),
        ("stage-1 step, cached latent", with_cache),
        ("stage-1 step, encoding on the fly", on_the_fly),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=12, help="2K photos to generate (default 12)")
    ap.add_argument("--samples", type=int, default=64, help="crops timed per loader (default 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: per-core cost)")
    ap.add_argument("--step-repeats", type=int, default=2)
    ap.add_argument("--skip-step", action="store_true", help="only the data loaders")
    ap.add_argument("--workdir", help="keep the photos and shards here (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tadm-bench-"))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, workers {args.workers}, data in {root}"
    )
    try:
        if not (root / "photos").is_dir():
            make_photos(root / "photos", args.photos)
        mb = sum(p.stat().st_size for p in (root / "photos").iterdir()) / 1e6
        print(f"{args.photos} photos {SIZE[0]}x{SIZE[1]} (half JPEG q92, half PNG), {mb:.0f} MB")
        if not (root / "shards" / "index.json").exists():
            pack_shards(root / "photos", root / "shards", maxcount=4, progress=False)
        if not (root / "latent_shards" / "index.json").exists():
            tiny = StableDiffusionTwin("tiny-sd15")
            tiny.load_for_stage("rescaler")
            opts = LatentOptions(tiny, crop=CROP, crops_per_image=4, flips=True)
            pack_shards(root / "photos", root / "latent_shards", maxcount=4, latents=opts, progress=False)
        rows = data_rows(root, args.samples, args.batch, args.workers, args.photos)
        base = rows[0][1]
        print(f"\n{'512x512 training crops':<46} {'samples/s':>10} {'vs folder':>10}")
        for name, rate in rows:
            print(f"{name:<46} {rate:>10.2f} {rate / base:>9.2f}x")
        if not args.skip_step:
            steps = step_rows(args.step_repeats)
            print(f"\n{'full-size SD VAE (random), paper DFRM, x16, 1x512x512':<56} {'s':>8}")
            for name, seconds in steps:
                print(f"{name:<56} {seconds:>8.2f}")
            print(f"on-the-fly / cached step time: {steps[2][1] / steps[1][1]:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
