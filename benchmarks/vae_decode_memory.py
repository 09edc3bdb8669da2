"""Tensor peak of the FULL-SIZE SD VAE decoder per output pixel (random weights, no download).

``tadm.inference.device_memory.DECODER_BYTES_PER_PIXEL`` is what tadm assumes when it decides whether a
latent fits a GPU to be decoded whole (no tiles, no GroupNorm statistics pass). This measures it: the bytes
of the tensors the decoder creates that are alive at once, at their peak (``train_memory.LivePeak``), for
one image, in fp32, at a few sizes; the weights do not count. fp32 bounds bf16 autocast on a GPU: there
the convolutions' outputs are bf16 but GroupNorm and SiLU stay fp32 (SDXL's VAE runs in fp32 anyway); bf16
autocast on this CPU takes minutes for one 128-px decode. A CUDA caching allocator holds somewhat more than
the tensor peak (fragmentation), which the assumed value's headroom covers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vae_decode_memory.py [--sizes 128 256 384]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from train_memory import LivePeak  # noqa: E402

from tadm.inference.device_memory import DECODER_BYTES_PER_PIXEL  # noqa: E402
from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384], help="square output sides (px)")
    args = ap.parse_args()
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**FULL_SIZE_VAE).eval().requires_grad_(False)
    weights = list(vae.parameters()) + list(vae.buffers())
    print(f"assumed by tadm: {DECODER_BYTES_PER_PIXEL} bytes per output pixel and image")
    print("| output | precision | tensor peak MiB | bytes / pixel | s |\n|---|---|---|---|---|")
    for side in args.sizes:
        z = torch.randn(1, 4, side // 8, side // 8)
        peak = LivePeak(weights + [z])
        t = time.perf_counter()
        with peak:
            vae.decode(z)
        secs = time.perf_counter() - t
        per_px = peak.peak / side**2
        print(f"| {side}x{side} | fp32 | {peak.peak / 2**20:.0f} | {per_px:.0f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
