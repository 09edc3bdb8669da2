"""Wall time of `tadm downscale` + `tadm upscale` on one 12 MP photo, for several models in one run.

    .venv/bin/python benchmarks/codec_time.py [--ckpt A --ckpt B ...] [--repeats 2] [--threads 2]

A shipped model may get slower only within limits (issue: 12 MP on 2 cores within 2x the previous shipped
model's time), and this machine is noisy, so the models are timed alternately in the same run and the ratio to
the first is what counts. The photo is 4000x3000 px: a held-out photo (assets/photos/heldout/cups.jpg)
resized by bicubic, enough to time the codec (its content does not change the work). Each timing is the
user's two commands as subprocesses, start-up included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from quality_cpu import codec_round_trip  # noqa: E402

DEFAULT_MODELS = [
    REPO / "assets/models/quickstart_x16.safetensors",
    REPO / "assets/models/photos_x16.safetensors",
]


def round_trip_seconds(ckpt: Path, photo: Path, work: Path, threads: int) -> float:
    start = time.perf_counter()
    codec_round_trip(ckpt, photo, work, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, action="append", help="a model (repeat; default: the two shipped)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    models = args.ckpt or DEFAULT_MODELS
    work = Path(tempfile.mkdtemp(prefix="tadm-codec-time-"))
    photo = work / "photo_12mp.png"
    Image.open(REPO / "assets/photos/heldout/cups.jpg").convert("RGB").resize(
        (4000, 3000), Image.Resampling.BICUBIC
    ).save(photo)
    times: dict[Path, list[float]] = {m: [] for m in models}
    for _ in range(args.repeats):
        for m in models:  # alternate, so drift in the machine's load falls on every model alike
            times[m].append(round_trip_seconds(m, photo, work / m.stem, args.threads))
    first = statistics.median(times[models[0]])
    print(f"downscale + upscale of a 4000x3000 photo, {args.threads} torch threads, {args.repeats} runs each")
    for m in models:
        med = statistics.median(times[m])
        runs = ", ".join(f"{t:.1f}" for t in times[m])
        print(f"{m.name:<34} median {med:6.1f} s ({runs})  ratio to {models[0].name}: {med / first:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
