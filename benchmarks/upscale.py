"""Upscale speed and memory of the codec with FULL-SIZE SD architectures (random weights, no download).

Builds the SD 2.1-base (or SDXL) UNet and VAE at full size with random weights, a full-size x16 DFRM,
the TPM and the hybrid scheduler, then runs ``Codec.upscale`` (tiled exactly like ``tadm upscale``:
latent tiles 96 / overlap 32, VAE tiles 768 px / overlap 128) on a random 8-bit LR image, and reports:

- total upscale time, and the time spent inside UNet forwards and VAE-decoder forwards (hooks),
  so ``overhead = total / (UNet + decoder) - 1`` is measured in the same run (target <= 10 %);
- peak memory: RSS on the CPU (each size in its own process, so each peak is its own; target:
  7680x4320 <= 1.5 x 2048x2048), ``torch.cuda.max_memory_allocated`` on a GPU;
- on a GPU, images/s over ``--repeats`` runs after one warm-up.

    .venv/bin/python benchmarks/upscale.py                                   # CPU, sd21-base, 512/2048/8K
    .venv/bin/python benchmarks/upscale.py --sizes 512x512 --presets sdxl
    .venv/bin/python benchmarks/upscale.py --device cuda --precision bf16 --tile-batch 4 --repeats 3

Prints a table (and ``--json FILE`` writes the rows); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS as UNETS
from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE as VAE

CONTEXT = {"sd21-base": (1024, None), "sdxl": (2048, 1280)}


def build_codec(
    preset: str, device: str, precision: str, tile_batch: int, channels_last: bool, compile_unet: bool
):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.inference.codec import Codec
    from tadm.inference.tiling import Tiling
    from tadm.model import TADMModel

    torch.manual_seed(0)
    dev = torch.device(device)
    b = StableDiffusionBackbone(preset=preset)
    with dev:  # random init directly on the device (much faster on a GPU)
        b.vae = b._freeze(
            AutoencoderKL(**VAE, scaling_factor=b.preset.scaling_factor, force_upcast=preset == "sdxl"), dev
        )
        b.unet = b._freeze(UNet2DConditionModel(**UNETS[preset]), dev)
    b._set_schedule(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    ctx, pooled = CONTEXT[preset]
    b.prompt_embeds = torch.randn(1, 77, ctx)
    b.pooled_prompt_embeds = torch.randn(1, pooled) if pooled else None
    model = TADMModel(b, DFRM(scale=16), stage="enhancer", aligner=TimestepPredictionModule()).load_parts()
    model.to(dev).eval()
    if channels_last:
        b.unet.to(memory_format=torch.channels_last)
        b.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        b.unet = torch.compile(b.unet)
    return Codec(model, Tiling(tile_batch=tile_batch), precision)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    """Wait for the GPU, so wall-clock timers measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time and count of timed calls (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds, self.calls, self.device, self._t0 = 0.0, 0, device, 0.0

    def start(self, *_: Any) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self, *_: Any) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


class ForwardTimer(Timer):
    """Time spent inside a module's forward calls (hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        super().__init__(device)
        module.register_forward_pre_hook(self.start)
        module.register_forward_hook(self.stop)


class CallTimer(Timer):
    """Time spent inside a module-level function of ``tadm.inference.pipeline`` (patched in place)."""

    def __init__(self, name: str, device: torch.device) -> None:
        from tadm.inference import pipeline

        super().__init__(device)
        inner = getattr(pipeline, name)

        def timed(*a: Any, **kw: Any) -> Any:
            self.start()
            out = inner(*a, **kw)
            self.stop()
            return out

        setattr(pipeline, name, timed)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_case(args: argparse.Namespace, preset: str, sizes: list[str]) -> list[dict[str, Any]]:
    dev = torch.device(args.device)
    t_build = time.perf_counter()
    codec = build_codec(
        preset, args.device, args.precision, args.tile_batch, args.channels_last, args.compile
    )
    build_s = time.perf_counter() - t_build
    unet = codec.module.backbone.unet
    unet_timer = ForwardTimer(getattr(unet, "_orig_mod", unet), dev)
    dec_timer = ForwardTimer(codec.module.backbone.vae.decoder, dev)
    # the rest of the path, to see where the overhead goes: DFRM upscale (fp32), TPM, hybrid scheduler
    parts = {
        "dfrm": CallTimer("rescale_up", dev),
        "aligner": ForwardTimer(codec.module.aligner, dev),
        "enhancer": ForwardTimer(codec.module.enhancer, dev),
    }
    rss_loaded = rss_gb()
    rows = []
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 256, (1, 3, -(-h // 16), -(-w // 16)), generator=g).float() / 127.5 - 1
        # warm-up (kernels, allocator, compile) on the GPU with this size; on the CPU with a small image
        warm = (h, w) if dev.type == "cuda" else (512, 512)
        codec.upscale(y[..., : warm[0] // 16, : warm[1] // 16], warm)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for timer in (unet_timer, dec_timer, *parts.values()):
            timer.reset()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = codec.upscale(y, (h, w))
            sync(dev)
            times.append(time.perf_counter() - t0)
        assert out.image.shape[-2:] == (h, w) and torch.isfinite(out.image).all()
        total = sum(times)
        inner = unet_timer.seconds + dec_timer.seconds
        rows.append(
            {
                "preset": preset,
                "size": size,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "precision": args.precision,
                "seconds": total / args.repeats,
                "images_per_s": args.repeats / total,
                "unet_s": unet_timer.seconds / args.repeats,
                "unet_calls": unet_timer.calls // args.repeats,
                "decoder_s": dec_timer.seconds / args.repeats,
                "decoder_calls": dec_timer.calls // args.repeats,
                "overhead": total / inner - 1 if inner else float("nan"),
                **{f"{k}_s": t.seconds / args.repeats for k, t in parts.items()},
                "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1024**3 if dev.type == "cuda" else None,
                "peak_rss_gb": rss_gb(),
                "rss_after_build_gb": rss_loaded,
                "build_s": build_s,
                "attention": type(
                    next(iter(getattr(unet, "_orig_mod", unet).attn_processors.values()))
                ).__name__,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            profile_once(codec, y, (h, w), dev)
    return rows


def profile_once(codec: Any, y: torch.Tensor, size: tuple[int, int], dev: torch.device) -> None:
    """One more upscale under torch.profiler: the ops that take the most time (self time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        codec.upscale(y, size)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one upscale to {size[1]}x{size[0]}, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| preset | output | device | prec | s/image | img/s | UNet s (calls) | decoder s (calls) | overhead | peak RSS GB | peak GPU GB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        gpu = f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-"
        lines.append(
            f"| {r['preset']} | {r['size']} | {r['device']} | {r['precision']} | {r['seconds']:.2f} | "
            f"{r['images_per_s']:.3f} | {r['unet_s']:.2f} ({r['unet_calls']}) | {r['decoder_s']:.2f} "
            f"({r['decoder_calls']}) | {100 * r['overhead']:+.1f}% | {r['peak_rss_gb']:.2f} | {gpu} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["sd21-base"], choices=sorted(UNETS))
    ap.add_argument("--sizes", nargs="+", default=["512x512", "2048x2048", "7680x4320"], help="WxH outputs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tile-batch", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per size")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run in this process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if args.one or args.device != "cpu":
        for preset in args.presets:  # one process per preset: the GPU peak is reset per size
            rows += run_case(args, preset, args.sizes)
    else:  # CPU: every size in a fresh process, so each peak RSS is that size's own
        for preset in args.presets:
            for size in args.sizes:
                cmd = [sys.executable, __file__, "--one", "--presets", preset, "--sizes", size]
                cmd += [
                    "--precision",
                    args.precision,
                    "--repeats",
                    str(args.repeats),
                    "--tile-batch",
                    str(args.tile_batch),
                ]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                res = subprocess.run(cmd, capture_output=True, text=True)
                out = [line for line in res.stdout.splitlines() if line.startswith("{")]
                if res.returncode or not out:
                    print(
                        f"{preset} {size}: FAILED (exit {res.returncode})\n{res.stderr[-2000:]}", flush=True
                    )
                    continue
                rows.append(json.loads(out[-1]))
                print(out[-1], flush=True)
    if not args.one:
        print(table(rows))
        if len({r["size"] for r in rows}) > 1:
            for preset in args.presets:
                by = {r["size"]: r for r in rows if r["preset"] == preset}
                if "2048x2048" in by and "7680x4320" in by:
                    k = "peak_gpu_gb" if by["2048x2048"]["peak_gpu_gb"] is not None else "peak_rss_gb"
                    print(
                        f"{preset}: peak memory 7680x4320 / 2048x2048 = {by['7680x4320'][k] / by['2048x2048'][k]:.2f}x"
                    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
