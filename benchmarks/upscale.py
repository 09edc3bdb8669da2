"""Upscale speed and memory of the codec with FULL-SIZE SD architectures (random weights, no download).

Builds the SD 2.1-base (or SDXL) UNet and VAE at full size with random weights, a full-size x16 DFRM,
the TPM and the hybrid scheduler, then runs ``Codec.upscale`` (tiled exactly like ``tadm upscale``:
latent tiles 96 / overlap 32, VAE tiles 768 px / overlap 128, an image decoded whole where the GPU has room
for it: ``--no-vae-whole`` keeps the VAE tiles) on random 8-bit LR images, and reports per
preset, output size, batch (``--batches``: images per call, as ``tadm upscale --batch-size``) and mode
(``--modes eager compile``: ``--compile`` compiles, after the eager cases, what ``tadm upscale --compile``
does: UNet, DFRM upscale, TPM and hybrid scheduler; the VAE stays eager):

- throughput: ``--repeats`` upscales after one warm-up, nothing hooked (no extra synchronisation): seconds per
  call and images/s;
- where the time goes, from one more upscale with every part timed (CUDA-synchronised forward hooks): UNet,
  VAE decoder (and its GroupNorm statistics pass), DFRM, TPM, hybrid scheduler; ``overhead = total / (UNet +
  decoder) - 1`` of that run (target <= 10 %), ``gn_stats_share`` = the statistics pass / the decoder's
  output pass (target <= 30 %; 0 when the image is one VAE tile);
- host synchronisations of one upscale (``--sync-count``, CUDA only): ``torch.cuda.set_sync_debug_mode``'s
  warnings, which name every op that makes the CPU wait;
- peak memory: RSS on the CPU (each size in its own process, so each peak is its own; target:
  7680x4320 <= 1.5 x 2048x2048), ``torch.cuda.max_memory_allocated`` over the timed calls on a GPU;
- ``--profile``: one more upscale of the first size under ``torch.profiler`` (first batch, each mode): the
  top ops by GPU (CPU) time and the count of CUDA synchronisation calls, printed and written to
  ``--profile-out``.

    .venv/bin/python benchmarks/upscale.py                                   # CPU, sd21-base, 512/2048/8K
    .venv/bin/python benchmarks/upscale.py --sizes 512x512 --presets sdxl
    python benchmarks/upscale.py --device cuda --precision bf16 --tile-batch 4 --batches 1 8 --modes eager compile

Prints a table (and ``--json FILE`` writes the rows after every case); asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS as UNETS
from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE as VAE

CONTEXT = {"sd21-base": (1024, None), "sdxl": (2048, 1280)}


def build_codec(
    preset: str, device: str, precision: str, tile_batch: int, channels_last: bool, compile: bool
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
    model.to(dev).eval().prepare_inference(channels_last=channels_last, compile=compile)
    return Codec(model, Tiling(tile_batch=tile_batch), precision)  # type: ignore[arg-type]


def build_tiny_codec(
    preset: str, device: str, precision: str, tile_batch: int, channels_last: bool, compile: bool
):  # type: ignore[no-untyped-def]
    """The same codec on the preset's tiny twin (``--tiny``): a check of the script, not a measurement."""
    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.inference.codec import Codec
    from tadm.inference.tiling import Tiling
    from tadm.model import TADMModel
    from tadm.testing.twins.unet_twins import StableDiffusionTwin

    torch.manual_seed(0)
    twin = StableDiffusionTwin("tiny-sdxl" if preset == "sdxl" else "tiny-sd21")
    rescaler = DFRM(scale=16, width=16, num_resblocks=1, num_couplings=2)
    model = TADMModel(twin, rescaler, stage="enhancer", aligner=TimestepPredictionModule()).load_parts()
    model.to(torch.device(device)).eval()
    model.prepare_inference(channels_last=channels_last, compile=compile)
    tiling = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, tile_batch=tile_batch)
    return Codec(model, tiling, precision)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    """Wait for the GPU, so wall-clock timers measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time and count of timed calls (synchronised on CUDA), while ``enabled`` (off: free)."""

    enabled = False  # one switch for every timer: throughput runs are not hooked

    def __init__(self, device: torch.device) -> None:
        self.seconds, self.calls, self.device, self._t0 = 0.0, 0, device, 0.0

    def start(self, *_: Any) -> None:
        if Timer.enabled:
            sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self, *_: Any) -> None:
        if Timer.enabled:
            sync(self.device)
            self.seconds += time.perf_counter() - self._t0
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        """Take the timer off what it times."""


class ForwardTimer(Timer):
    """Time spent inside a module's forward calls (hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        super().__init__(device)
        self.hooks = [module.register_forward_pre_hook(self.start), module.register_forward_hook(self.stop)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class CallTimer(Timer):
    """Time spent inside a module-level function (``tadm.inference.pipeline.rescale_up``, ...), patched in place."""

    def __init__(self, module: Any, name: str, device: torch.device) -> None:
        super().__init__(device)
        inner = getattr(module, name)

        def timed(*a: Any, **kw: Any) -> Any:
            self.start()
            try:
                return inner(*a, **kw)
            finally:
                self.stop()

        setattr(module, name, timed)
        self.remove = lambda: setattr(module, name, inner)  # type: ignore[method-assign]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def part_timers(codec: Any, dev: torch.device) -> dict[str, Timer]:
    """Timers of the UNet (whatever the backbone calls: the compiled wrapper once compiled), the VAE decoder,
    its GroupNorm statistics pass, and the rest of the path: DFRM upscale (fp32), TPM, hybrid scheduler."""
    from tadm.inference import groupnorm_sync, pipeline

    m = codec.module
    return {
        "unet": ForwardTimer(m.backbone.unet, dev),
        "decoder": ForwardTimer(m.backbone.vae.decoder, dev),
        "gn_stats": CallTimer(groupnorm_sync, "collect_group_stats", dev),
        "dfrm": CallTimer(pipeline, "rescale_up", dev),
        "aligner": ForwardTimer(m.aligner, dev),
        "enhancer": ForwardTimer(m.enhancer, dev),
    }


def count_host_syncs(codec: Any, y: torch.Tensor, size: tuple[int, int], dev: torch.device) -> dict[str, Any]:
    """One upscale under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronising ops it makes, by the
    first line of their warning."""
    import warnings

    if dev.type != "cuda":
        return {}
    sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            codec.upscale(y, size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    kinds: dict[str, int] = {}
    for w in caught:
        line = str(w.message).splitlines()[0][:120]
        if "synchroniz" in line.lower():
            kinds[line] = kinds.get(line, 0) + 1
    return {"host_syncs": sum(kinds.values()), "host_sync_kinds": kinds}


def run_case(args: argparse.Namespace, preset: str, sizes: list[str]) -> list[dict[str, Any]]:
    from dataclasses import replace

    dev = torch.device(args.device)
    t_build = time.perf_counter()
    make = build_tiny_codec if args.tiny else build_codec
    codec = make(preset, args.device, args.precision, args.tile_batch, args.channels_last, False)
    build_s = time.perf_counter() - t_build
    rss_loaded = rss_gb()
    rows = []
    timers = part_timers(codec, dev)
    warmed: set[tuple[int, int, int, str]] = set()
    for mode in args.modes:
        if mode == "compile":
            m = codec.module
            for name in ("unet", "aligner", "enhancer"):
                timers[name].remove()  # no hooks inside a compiled graph: the timers wrap the compiled calls
            m.prepare_inference(compile=True)  # what tadm upscale --compile does
            timers["unet"] = ForwardTimer(m.backbone.unet, dev)  # the OptimizedModule around the UNet
            timers["aligner"] = CallTimer(m.aligner, "_compiled_call_impl", dev)  # nn.Module.compile's
            timers["enhancer"] = CallTimer(m.enhancer, "_compiled_call_impl", dev)
        for size in sizes:
            w, h = (int(v) for v in size.split("x"))
            for batch in args.batches:
                # the UNet sees at most max(--tile-batch, batch) samples per call
                tile_batch = max(1, args.tile_batch // batch)
                codec.tiling = replace(codec.tiling, tile_batch=tile_batch, vae_whole=args.vae_whole)
                g = torch.Generator().manual_seed(0)
                y = (
                    torch.randint(0, 256, (batch, 3, -(-h // 16), -(-w // 16)), generator=g).float() / 127.5
                    - 1
                )
                # eager: another batch of a size warmed needs no warm-up; compiled, a new batch is a new
                # shape, compiled again in its first call (timed without its own warm-up: 90 s on a CPU)
                key = (h, w, batch if mode == "compile" else 0, mode)
                warm = key not in warmed
                warmed.add(key)
                row = one_case(args, codec, timers, y, (h, w), dev, warm)
                row |= {"preset": preset, "size": size, "batch": batch, "mode": mode, "build_s": build_s}
                row |= {"rss_after_build_gb": rss_loaded, "tile_batch": codec.tiling.tile_batch}
                row |= {"vae_whole": codec.tiling.vae_whole}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json_rows is not None:
                    args.json_rows.append(row)
                    write_json(args)
                if args.profile and size == sizes[0] and batch == args.batches[0]:
                    profile_once(
                        codec, y, (h, w), dev, f"{preset} {size} batch {batch} {mode}", args.profile_out
                    )
    return rows


def one_case(
    args: argparse.Namespace,
    codec: Any,
    timers: dict[str, Timer],
    y: torch.Tensor,
    size: tuple[int, int],
    dev: torch.device,
    warm: bool = True,
) -> dict[str, Any]:
    """Warm-up, timed calls with nothing hooked (``--repeats`` at most, fewer once ``--seconds-per-case`` is
    spent), then, for one image per call, one upscale with every part timed and the host-sync count."""
    h, w = size
    batch = y.shape[0]
    # warm-up (kernels, allocator, compile) on the GPU with this size; on the CPU with a small image
    t0 = time.perf_counter()
    if warm and dev.type == "cuda":
        codec.upscale(y, size)
    elif warm:
        codec.upscale(y[:1, :, :32, :32], (512, 512))
    sync(dev)
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times: list[float] = []
    while not times or (len(times) < args.repeats and sum(times) < args.seconds_per_case):
        t0 = time.perf_counter()
        out = codec.upscale(y, size)
        sync(dev)
        times.append(time.perf_counter() - t0)
    assert out.image.shape == (batch, 3, h, w) and torch.isfinite(out.image).all()
    peak_gpu = torch.cuda.max_memory_allocated(dev) / 1024**3 if dev.type == "cuda" else None
    total = sum(times)
    row: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": args.precision,
        "seconds": total / len(times),
        "seconds_per_image": total / len(times) / batch,
        "images_per_s": len(times) * batch / total,
        "repeats": len(times),
        "warmup_s": warm_s if warm else None,
        "peak_gpu_gb": peak_gpu,
        "peak_rss_gb": rss_gb(),
        "attention": type(
            next(iter(_unwrapped(codec.module.backbone.unet).attn_processors.values()))
        ).__name__,
    }
    if batch == 1 or args.breakdown_all:
        row |= breakdown(codec, timers, y, size, dev)
    if args.sync_count and batch == 1:
        row |= count_host_syncs(codec, y, size, dev)
    if args.op_counts and batch == 1 and not _compiled(codec):
        row |= count_ops(codec, y, size)
    return row


def _compiled(codec: Any) -> bool:
    return hasattr(codec.module.backbone.unet, "_orig_mod")


class OpCounter(TorchDispatchMode):
    """aten ops per part of the path while active: in eager mode each is at least one kernel launch on a GPU,
    which is what a batch-1 512-px upscale is bound by there (the UNet's ~3900 ops in 0.07 s on an H200)."""

    def __init__(self) -> None:
        super().__init__()
        self.part = ["rest"]
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[self.part[-1]] += 1
        return func(*args, **(kwargs or {}))

    def enter(self, name: str) -> Callable[..., None]:
        return lambda *_: self.part.append(name)

    def leave(self, *_: Any) -> None:
        self.part.pop()


def count_ops(codec: Any, y: torch.Tensor, size: tuple[int, int]) -> dict[str, Any]:
    """One eager upscale under :class:`OpCounter`: aten ops of the UNet, the VAE decoder (every pass), the
    DFRM upscale, TPM, hybrid scheduler and the rest (tiling, blending, cropping, casts)."""
    from tadm.inference import pipeline

    m = codec.module
    counter = OpCounter()
    parts = {
        "unet": m.backbone.unet,
        "decoder": m.backbone.vae.decoder,
        "aligner": m.aligner,
        "enhancer": m.enhancer,
    }
    hooks = []
    for name, module in parts.items():
        hooks += [
            module.register_forward_pre_hook(counter.enter(name)),
            module.register_forward_hook(counter.leave),
        ]
    rescale_up = pipeline.rescale_up

    def counted(*a: Any, **kw: Any) -> Any:
        counter.enter("dfrm")()
        try:
            return rescale_up(*a, **kw)
        finally:
            counter.leave()

    pipeline.rescale_up = counted
    try:
        with counter:
            codec.upscale(y, size)
    finally:
        pipeline.rescale_up = rescale_up
        for hook in hooks:
            hook.remove()
    return {"aten_ops": dict(counter.counts)}


def breakdown(
    codec: Any, timers: dict[str, Timer], y: torch.Tensor, size: tuple[int, int], dev: torch.device
) -> dict[str, Any]:
    """One upscale with every part timed (each hook synchronises: its total is a little above a clean call)."""
    for timer in timers.values():
        timer.reset()
    Timer.enabled = True
    try:
        t0 = time.perf_counter()
        codec.upscale(y, size)
        sync(dev)
        hooked_s = time.perf_counter() - t0
    finally:
        Timer.enabled = False
    unet, dec, stats = timers["unet"].seconds, timers["decoder"].seconds, timers["gn_stats"].seconds
    return {
        "hooked_s": hooked_s,
        "unet_s": unet,
        "unet_calls": timers["unet"].calls,
        "decoder_s": dec,
        "decoder_calls": timers["decoder"].calls,
        "overhead": hooked_s / (unet + dec) - 1 if unet + dec else float("nan"),
        "gn_stats_s": stats,
        "gn_stats_share": stats / (dec - stats) if dec > stats else float("nan"),
        **{f"{k}_s": timers[k].seconds for k in ("dfrm", "aligner", "enhancer")},
    }


def _unwrapped(module: torch.nn.Module) -> Any:
    return getattr(module, "_orig_mod", module)


def profile_once(
    codec: Any, y: torch.Tensor, size: tuple[int, int], dev: torch.device, what: str, out: str | None
) -> None:
    """One more upscale under torch.profiler: the ops that take the most GPU (CPU) time, and how often the
    CPU waited for the GPU (CUDA synchronisation and device-to-host copies)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        codec.upscale(y, size)
        sync(dev)
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if dev.type == "cuda":
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
    waits = {
        e.key: e.count
        for e in events
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
        or ("Memcpy" in e.key and "DtoH" in e.key)
    }
    text = (
        f"profile of one upscale, {what}, by {key}:\n"
        + events.table(sort_by=key, row_limit=25, max_name_column_width=70)
        + f"\nCUDA synchronisation calls and device-to-host copies: {waits or 'none'}\n\n"
    )
    print(text, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(text)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | output | batch | mode | device | prec | s / call | images / s | UNet s (calls) | decoder s (calls) "
        "| GN stats / decoder | overhead | host syncs | aten ops UNet / decoder / rest | peak GPU GB | peak RSS GB |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        gpu = f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-"
        syncs = r.get("host_syncs", "-")
        ops = _ops(r.get("aten_ops"))
        lines.append(
            f"| {r['preset']} | {r['size']} | {r['batch']} | {r['mode']} | {r['device']} | {r['precision']} | "
            f"{r['seconds']:.3f} | {r['images_per_s']:.2f} | {_parts(r)} | {syncs} | {ops or '-'} | {gpu} | {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def _ops(counts: dict[str, int] | None) -> str | None:
    """aten ops of the UNet / the decoder / everything else, or None when not counted."""
    if not counts:
        return None
    unet, dec = counts.get("unet", 0), counts.get("decoder", 0)
    return f"{unet} / {dec} / {sum(counts.values()) - unet - dec}"


def _parts(r: dict[str, Any]) -> str:
    """The breakdown columns (UNet, decoder, statistics pass, overhead), or dashes for a throughput-only row."""
    if "unet_s" not in r:
        return "- | - | - | -"
    return (
        f"{r['unet_s']:.3f} ({r['unet_calls']}) | {r['decoder_s']:.3f} ({r['decoder_calls']}) | "
        f"{100 * r['gn_stats_share']:+.0f}% | {100 * r['overhead']:+.1f}%"
    )


def write_json(args: argparse.Namespace) -> None:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(args.json_rows, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["sd21-base"], choices=sorted(UNETS))
    ap.add_argument("--sizes", nargs="+", default=["512x512", "2048x2048", "7680x4320"], help="WxH outputs")
    ap.add_argument("--batches", nargs="+", type=int, default=[1], help="images per upscale call")
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=("eager", "compile"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per case, at most")
    ap.add_argument(
        "--seconds-per-case", type=float, default=float("inf"), help="no more timed calls once this is spent"
    )
    ap.add_argument("--breakdown-all", action="store_true", help="time the parts for batches > 1 too")
    ap.add_argument("--tiny", action="store_true", help="tiny twins instead of full-size (a dry run)")
    ap.add_argument(
        "--tile-batch", type=int, default=1, help="latent tiles per UNet call (divided by the batch)"
    )
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="the same as --modes compile")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this file (after every case)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--profile", action="store_true", help="also profile the first size and batch per mode")
    ap.add_argument("--profile-out", default=None, help="append the profiles to this file")
    ap.add_argument("--sync-count", action="store_true", help="count host synchronisations (CUDA)")
    ap.add_argument("--op-counts", action="store_true", help="count aten ops per part (eager, batch 1)")
    ap.add_argument(
        "--vae-whole",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode whole when the GPU has room (tadm's default); --no-vae-whole: always VAE tiles",
    )
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run in this process
    args = ap.parse_args()
    if args.compile:
        args.modes = ["compile"]
    args.json_rows = [] if args.json else None
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if args.one or args.device != "cpu":
        for preset in args.presets:  # the GPU peak is reset per case
            rows += run_case(args, preset, args.sizes)
    else:  # CPU: every size in a fresh process, so each peak RSS is that size's own
        for preset in args.presets:
            for size in args.sizes:
                cmd = [sys.executable, __file__, "--one", "--presets", preset, "--sizes", size]
                cmd += ["--precision", args.precision, "--repeats", str(args.repeats)]
                cmd += ["--seconds-per-case", str(args.seconds_per_case)] + (["--tiny"] if args.tiny else [])
                cmd += ["--breakdown-all"] if args.breakdown_all else []
                cmd += [
                    f
                    for f in ("--profile", "--sync-count", "--op-counts", "--channels-last")
                    if getattr(args, f[2:].replace("-", "_"))
                ]
                cmd += ["--profile-out", args.profile_out] if args.profile_out else []
                cmd += ["--tile-batch", str(args.tile_batch), "--modes", *args.modes]
                cmd += [] if args.vae_whole else ["--no-vae-whole"]
                cmd += ["--batches", *map(str, args.batches)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                res = subprocess.run(cmd, capture_output=True, text=True)
                out = [line for line in res.stdout.splitlines() if line.startswith("{")]
                if res.returncode or not out:
                    print(
                        f"{preset} {size}: FAILED (exit {res.returncode})\n{res.stderr[-2000:]}", flush=True
                    )
                    continue
                for line in out:
                    rows.append(json.loads(line))
                    print(line, flush=True)
                if args.json_rows is not None:
                    args.json_rows[:] = rows
                    write_json(args)
    if not args.one:
        print(table(rows))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(table(rows) + "\n")
        if len({r["size"] for r in rows}) > 1:
            for preset in args.presets:
                by = {r["size"]: r for r in rows if r["preset"] == preset and r["batch"] == 1}
                if "2048x2048" in by and "7680x4320" in by:
                    k = "peak_gpu_gb" if by["2048x2048"]["peak_gpu_gb"] is not None else "peak_rss_gb"
                    print(
                        f"{preset}: peak memory 7680x4320 / 2048x2048 = {by['7680x4320'][k] / by['2048x2048'][k]:.2f}x"
                    )


if __name__ == "__main__":
    main()
