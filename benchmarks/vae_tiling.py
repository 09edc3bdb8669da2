"""Tiled vs whole-image VAE: GroupNorm statistics per tile vs synchronised over all tiles.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vae_tiling.py [--steps 400] [--tile 128 --overlap 32]
        [--passes 1 2 4] [--vae-cache /tmp/tiny_vae.pt]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vae_tiling.py --full-size 512 --tile 256 --overlap 64

A random VAE's outputs are dominated by its random weights, so the script first trains the tiny
SD-2.1 twin's ``AutoencoderKL`` (same classes as SD's VAE, mid-block attention included, factor 8,
~0.4 M parameters) for ``--steps`` steps on random crops of the bundled training photos
(``assets/samples/train``), then runs the pipeline's VAE encode / decode
(:mod:`tadm.inference.pipeline`) on the held-out validation photos (``assets/samples/val``),
whole and on ``--tile`` pixel tiles, and prints the Y-PSNR of each tiled result against the
whole-image one, per ``Tiling.vae_norm`` mode and number of statistics passes. Nothing is
asserted (``tests/inference/test_tiling.py`` asserts the ordering on a smaller case). ``--full-size`` instead
times the tiled encode / decode of the full-size SD VAE (random weights) with and without the
statistics pass.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
from tadm.datamodules.image_io import load_image
from tadm.evaluation.metrics import psnr_y
from tadm.inference import groupnorm_sync, pipeline
from tadm.inference.groupnorm_sync import collect_group_stats
from tadm.inference.tiling import NO_TILING, Tiling
from tadm.testing.twins.unet_twins import StableDiffusionTwin

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
PHOTOS = Path(__file__).resolve().parent.parent / "assets" / "photos" / "heldout"


def train_tiny_vae(steps: int, crop: int = 96, batch: int = 8, seed: int = 0) -> StableDiffusionBackbone:
    """The tiny-sd21 backbone with its VAE trained to reconstruct photo crops (L1 + MSE + tiny KL)."""
    bb = StableDiffusionTwin("tiny-sd21")
    bb.load(["vae"])
    vae = bb.vae
    assert vae is not None
    photos = [load_image(p) for p in sorted((SAMPLES / "train").iterdir())]
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        crops = [
            _random_crop(photos[int(torch.randint(len(photos), (1,), generator=g))], crop, g)
            for _ in range(batch)
        ]
        x = torch.stack(crops)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(
                f"  step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    vae.eval().requires_grad_(False)
    return bb


def _random_crop(img: Tensor, size: int, g: torch.Generator) -> Tensor:
    """A ``size`` crop at a random scale in [size / short side, 1] (tiny VAEs learn from mixed scales)."""
    short = min(img.shape[-2:])
    s = float(torch.empty(1).uniform_(size / short, 1.0, generator=g))
    if s < 1.0:
        img = F.interpolate(img[None], scale_factor=s, mode="area")[0]
    h, w = img.shape[-2:]
    y = int(torch.randint(h - size + 1, (1,), generator=g))
    x = int(torch.randint(w - size + 1, (1,), generator=g))
    return img[:, y : y + size, x : x + size]


def evaluation_images(folder: Path = SAMPLES / "val", side: int | None = None) -> list[tuple[str, Tensor]]:
    """The photos of ``folder``, area-downscaled to ``side`` px on their long side when larger (None: as
    they are), cropped to multiples of 8."""
    out = []
    for p in sorted(folder.iterdir()):
        img = load_image(p)[None]
        if side is not None and side < max(img.shape[-2:]):
            img = F.interpolate(
                img, scale_factor=side / max(img.shape[-2:]), mode="area", recompute_scale_factor=False
            )
        out.append((p.name, img[..., : img.shape[-2] // 8 * 8, : img.shape[-1] // 8 * 8]))
    return out


@torch.no_grad()
def full_size_timing(size: int, tile: int, overlap: int, device: str = "cpu") -> None:
    """Seconds of the tiled encode and decode of the FULL-SIZE SD VAE (random weights): per-tile vs
    synced statistics (one pass), i.e. what the statistics pass costs at real scale (on a GPU: bf16
    autocast, one warm-up per mode)."""
    from diffusers import AutoencoderKL

    from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE

    torch.manual_seed(0)
    bb = StableDiffusionBackbone("sd21-base")
    dev = torch.device(device)
    bb.vae = bb._freeze(AutoencoderKL(**FULL_SIZE_VAE, scaling_factor=0.18215), dev)
    x = torch.rand(1, 3, size, size, device=dev) * 2 - 1
    where = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    )
    print(f"full-size SD VAE, {size}x{size}, {tile}-px tiles, overlap {overlap}, {where}")
    print("| GroupNorm statistics | encode s | decode s |\n|---|---|---|")

    def timed(fn, *a):  # type: ignore[no-untyped-def]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = fn(*a)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - t

    for norm in ("per_tile", "synced"):
        tiling = Tiling(vae_tile=tile, vae_overlap=overlap, vae_norm=norm)  # type: ignore[arg-type]
        for _ in range(2 if dev.type == "cuda" else 1):  # the first GPU run warms up
            z, t_enc = timed(pipeline.encode, bb, x, tiling)
            _, t_dec = timed(pipeline.decode, bb, z, tiling)
        print(f"| {norm} | {t_enc:.2f} | {t_dec:.2f} |", flush=True)


@contextlib.contextmanager
def statistics_from_pooled_input(k: int) -> Iterator[None]:
    """An experiment, not a tadm option: the statistics pass of synced tiles runs on the input average-pooled
    ``k`` x (a k^2-th of the pixels), the output pass on the full-size tiles with those statistics."""
    collect = groupnorm_sync.collect_group_stats

    def pooled(fn: Callable[[Tensor], object], x: Tensor, **kw: int) -> list[groupnorm_sync.GroupStats]:
        return collect(fn, F.avg_pool2d(x, k, ceil_mode=True), **kw)  # type: ignore[arg-type]

    groupnorm_sync.collect_group_stats = pooled  # type: ignore[assignment]
    try:
        yield
    finally:
        groupnorm_sync.collect_group_stats = collect


def decode_summary(bb: StableDiffusionBackbone, tile: int, overlap: int, pooled: list[int]) -> None:
    """Tiled decode vs whole-image decode on the held-out photos: per-tile statistics, synchronised (one
    pass), and statistics from the ``pooled`` inputs; mean / median / worst Y-PSNR and the decode seconds."""
    variants: list[tuple[str, Tiling, int]] = [
        ("per_tile", Tiling(vae_tile=tile, vae_overlap=overlap, vae_norm="per_tile"), 1),
        ("synced, 1 pass", Tiling(vae_tile=tile, vae_overlap=overlap), 1),
    ]
    variants += [
        (f"synced, statistics from the input pooled {k}x", Tiling(vae_tile=tile, vae_overlap=overlap), k)
        for k in pooled
    ]
    scores: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    seconds = dict.fromkeys(scores, 0.0)
    images = evaluation_images(PHOTOS, side=384)  # the 24 held-out photos, never trained on
    for _, x in images:
        z = pipeline.encode(bb, x, NO_TILING)
        whole = pipeline.decode(bb, z, NO_TILING)
        for name, tiling, k in variants:
            with statistics_from_pooled_input(k) if k > 1 else contextlib.nullcontext():
                t = time.perf_counter()
                out = pipeline.decode(bb, z, tiling)
                seconds[name] += time.perf_counter() - t
            scores[name].append(psnr_y(out, whole).item())
    base = scores["synced, 1 pass"]
    print(f"\n{len(images)} held-out photos at 384 px, tiled decode vs whole-image decode, {tile}-px tiles")
    print("| GroupNorm statistics | mean dB | median dB | worst dB | beats synced on | decode s |")
    print("|---|---|---|---|---|---|")
    for name, vals in scores.items():
        wins = sum(a > b for a, b in zip(vals, base, strict=True))
        print(
            f"| {name} | {statistics.mean(vals):.2f} | {statistics.median(vals):.2f} | {min(vals):.2f} | "
            f"{wins} / {len(vals)} | {seconds[name]:.1f} |",
            flush=True,
        )


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps of the tiny VAE (0: random)")
    ap.add_argument("--tile", type=int, default=128, help="VAE tile in image pixels")
    ap.add_argument("--overlap", type=int, default=32, help="VAE tile overlap in image pixels")
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4], help="statistics passes to compare")
    ap.add_argument("--vae-cache", default=None, help="load the trained VAE from this file, or save it there")
    ap.add_argument(
        "--full-size", type=int, default=0, metavar="SIZE", help="instead: time the full-size VAE on SIZE^2"
    )
    ap.add_argument("--device", default="cpu", help="device of the --full-size timing (cuda: bf16 autocast)")
    ap.add_argument(
        "--heldout",
        type=int,
        nargs="*",
        default=None,
        metavar="K",
        help="instead: decode-only summary on the 24 held-out photos, with statistics from the input pooled "
        "K x as extra variants (an experiment)",
    )
    args = ap.parse_args()
    if args.full_size:
        full_size_timing(args.full_size, args.tile, args.overlap, args.device)
        return
    torch.manual_seed(0)
    cache = Path(args.vae_cache) if args.vae_cache else None
    if cache is not None and cache.exists():
        bb = StableDiffusionTwin("tiny-sd21")
        bb.load(["vae"])
        assert bb.vae is not None
        bb.vae.load_state_dict(torch.load(cache, weights_only=True))
        print(f"tiny-sd21 VAE weights from {cache}")
    else:
        print(f"training the tiny-sd21 VAE for {args.steps} steps on assets/samples/train ...", flush=True)
        with torch.enable_grad():
            bb = train_tiny_vae(args.steps)
        if cache is not None:
            assert bb.vae is not None
            torch.save(bb.vae.state_dict(), cache)
    if args.heldout is not None:
        decode_summary(bb, args.tile, args.overlap, args.heldout)
        return
    images = evaluation_images()
    modes: list[tuple[str, Tiling]] = [
        ("per_tile", Tiling(vae_tile=args.tile, vae_overlap=args.overlap, vae_norm="per_tile"))
    ]
    for p in args.passes:
        t = Tiling(vae_tile=args.tile, vae_overlap=args.overlap, vae_norm="synced", vae_norm_passes=p)
        modes.append((f"synced, {p} pass{'es' if p > 1 else ''}", t))
    x0 = images[0][1]
    z0 = pipeline.encode(bb, x0)
    n_enc = len(collect_group_stats(bb.encode, x0, tile=args.tile, overlap=args.overlap, align=8, passes=1))
    n_dec = len(collect_group_stats(bb.decode, z0, tile=args.tile // 8, overlap=args.overlap // 8, passes=1))
    exact = Tiling(vae_tile=args.tile, vae_overlap=args.overlap, vae_norm="synced", vae_norm_passes=99)
    modes.append(("synced, exact (passes until all are)", exact))
    print(f"GroupNorm calls: encoder {n_enc}, decoder {n_dec}; tiles {args.tile} px, overlap {args.overlap}")
    for name, x in images:
        z = pipeline.encode(bb, x, NO_TILING)
        rec = pipeline.decode(bb, z, NO_TILING)
        print(
            f"\n{name} {x.shape[-1]}x{x.shape[-2]}: whole-image VAE reconstruction {psnr_y(rec, x).item():.2f} dB vs the photo"
        )
        print(
            "| GroupNorm statistics | encode: decode(tiled z) vs whole | decode vs whole | round trip vs whole | s |"
        )
        print("|---|---|---|---|---|")
        for label, tiling in modes:
            t = time.perf_counter()
            zt = pipeline.encode(bb, x, tiling)
            rt = pipeline.decode(bb, zt, tiling)
            secs = time.perf_counter() - t
            enc = psnr_y(pipeline.decode(bb, zt, NO_TILING), rec).item()
            dec = psnr_y(pipeline.decode(bb, z, tiling), rec).item()
            both = psnr_y(rt, rec).item()
            print(f"| {label} | {enc:.2f} | {dec:.2f} | {both:.2f} | {secs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
