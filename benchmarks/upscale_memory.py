"""Peak memory of ``tadm upscale`` per output pixel: the slope behind ``--max-hr-megapixels``' default.

Runs ``tadm upscale`` with the shipped quickstart model (``assets/models/quickstart_x16.safetensors``) on a
random LR PNG at each ``--sizes`` output (the LR side is 1/16 of it), each in its own process so each peak
RSS is its own, and prints the peak RSS per size and the slope between the first and the last size:
``(peak_last - peak_first) / (pixels_last - pixels_first)`` bytes per output pixel. Tiled inference keeps
per-tile working memory constant, so the slope is what the whole-image buffers cost (the LR image, the
latent, the blend accumulator and its weights, the output, its 8-bit copy and the PNG encoder).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/upscale_memory.py                 # 2048 and 4096, ~1 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/upscale_memory.py --sizes 1024 2048 4096

Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "models" / "quickstart_x16.safetensors"

CHILD = """
import resource, sys, warnings
warnings.simplefilter("ignore")
from tadm.commands.main import main
code = main(["upscale", "--ckpt", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--no-progress"])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "EXIT", code)
"""


def peak_rss(side: int, scale: int, work: Path) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one ``tadm upscale`` to a ``side`` x ``side`` output."""
    lr = work / f"lr{side}.png"  # no tadm metadata: restored at the model's scale (a warning, no limit hit)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side // scale, side // scale, 3), dtype=np.uint8)).save(lr)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(MODEL), str(lr), str(work / f"out{side}")],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    line = next(x for x in done.stdout.splitlines() if x.startswith("PEAK_KB"))
    _, kb, _, code = line.split()
    if code != "0":
        raise SystemExit(f"tadm upscale exited {code}: {done.stderr}")
    return int(kb) * 1024.0, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="output sides (square)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            peak, seconds = peak_rss(side, 16, Path(tmp))
            rows.append({"side": side, "megapixels": side * side / 1e6, "peak_rss_bytes": peak, "s": seconds})
            print(
                f"{side}x{side} ({side * side / 1e6:.1f} MP): peak RSS {peak / 2**30:.3f} GiB, {seconds:.1f} s"
            )
    first, last = rows[0], rows[-1]
    slope = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (
        (last["megapixels"] - first["megapixels"]) * 1e6
    )
    base = first["peak_rss_bytes"] - slope * first["megapixels"] * 1e6
    print(f"slope: {slope:.1f} bytes per output pixel; intercept {base / 2**30:.3f} GiB")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "bytes_per_pixel": slope, "intercept": base}, indent=2)
        )


if __name__ == "__main__":
    main()
