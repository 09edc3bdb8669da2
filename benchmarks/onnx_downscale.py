"""The ONNX downscaler (``tadm export --format onnx``) against ``tadm downscale``: agreement and speed.

For a checkpoint (default: the shipped quickstart model) it exports the graph (timed), then for every
bundled photo (assets/samples/val and heldout) compares onnxruntime's LR image with the codec's
(``Codec.downscale``, tiled as ``tadm downscale`` runs it): values compared, values that differ, the
largest difference in 8-bit levels. Then it times one downscale per photo (median of ``--repeats``
after a warm-up) in PyTorch (the codec) and in onnxruntime (CPU provider), both on ``--threads``.
``--full-size-sd`` does the same for the full-size SD 2.1 VAE encoder (random weights, no download) and
a paper-size x16 DFRM (random) on ``--sd-size`` pixel noise images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_downscale.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_downscale.py --full-size-sd --sd-size 512

Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from tadm.inference.codec import Codec
from tadm.inference.lr_files import to_uint8
from tadm.model.onnx_export import Agreement, agreement, export_onnx

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "assets" / "models" / "quickstart_x16.safetensors"
PHOTOS = sorted(
    p
    for d in ("val", "heldout")
    for p in (REPO / "assets" / "samples" / d).iterdir()
    if p.suffix in (".png", ".jpg")
)


class Parts(nn.Module):
    """A backbone and a rescaler as the codec sees a model (no enhancer)."""

    aligner = None
    enhance_fn = None

    def __init__(self, backbone: nn.Module, rescaler: nn.Module) -> None:
        super().__init__()
        self.backbone, self.rescaler, self.scale = backbone, rescaler, rescaler.scale


def full_size_sd_codec() -> Codec:
    from diffusers import AutoencoderKL

    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE

    torch.manual_seed(0)
    backbone = StableDiffusionBackbone(preset="sd21")
    backbone.vae = backbone._freeze(
        AutoencoderKL(**FULL_SIZE_VAE, scaling_factor=backbone.preset.scaling_factor), torch.device("cpu")
    )
    return Codec(Parts(backbone, DFRM(scale=16, latent_scaling=backbone.scaling_factor)))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(codec: Codec, images: list[tuple[str, np.ndarray]], threads: int, repeats: int) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = export_onnx(codec, Path(tmp) / "downscaler.onnx")
        print(f"export: {time.perf_counter() - t:.1f} s wall, {path.stat().st_size / 1e6:.2f} MB")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    print(f"\n| image | HR | LR values | differing | max diff | torch ms | onnxruntime ms |\n|{'---|' * 7}")
    total = Agreement(0, 0, 0)
    torch_ms, ort_ms = [], []
    for name, hr in images:
        x = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0
        ref = to_uint8(codec.downscale(x)[0])
        got = session.run(None, {"hr": hr})[0]
        a = agreement(got, ref)
        total = total + a
        tt = median_time(lambda x=x: codec.downscale(x), repeats) * 1e3
        to = median_time(lambda hr=hr: session.run(None, {"hr": hr}), repeats) * 1e3
        torch_ms.append(tt)
        ort_ms.append(to)
        print(
            f"| {name} | {hr.shape[1]}x{hr.shape[0]} | {a.values} | {a.differing} | {a.max_abs} | {tt:.0f} | {to:.0f} |"
        )
    print(
        f"| **all {len(images)}** | | **{total.values}** | **{total.differing}** | **{total.max_abs}** | "
        f"{sum(torch_ms):.0f} | {sum(ort_ms):.0f} |"
    )
    print(f"\nonnxruntime / torch time: {sum(ort_ms) / sum(torch_ms):.2f} ({threads} thread(s))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(QUICKSTART), help="checkpoint (default: the quickstart model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full-size-sd", action="store_true", help="also the full-size SD 2.1 VAE + paper DFRM")
    ap.add_argument("--sd-size", type=int, default=512, help="image side for --full-size-sd")
    args = ap.parse_args()
    from tadm.model.loading import load_codec

    codec = load_codec(args.ckpt)
    print(f"## {args.ckpt}")
    photos = [(p.name, np.array(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))) for p in PHOTOS]
    compare(codec, photos, args.threads, args.repeats)
    if args.full_size_sd:
        print(f"\n## full-size SD 2.1 VAE encoder (random) + paper DFRM x16 (random), {args.sd_size} px")
        rng = np.random.default_rng(0)
        images = [
            (f"noise {i}", rng.integers(0, 256, (args.sd_size, args.sd_size, 3), dtype=np.uint8))
            for i in range(2)
        ]
        compare(full_size_sd_codec(), images, args.threads, max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
