"""Training steps of the one-GPU recipe on a GPU, measured: seconds per step and peak GPU memory (issue 25).

Each case is a recipe + ``configs/hardware/one_gpu_24gb.yaml`` (micro-batch 2 crops of 512 px, accumulate 8,
bf16-mixed, gradient checkpointing), parsed by tadm's own CLI and built on the FULL-SIZE architecture with
random weights (``benchmarks/train_memory.py``'s loader, made on the GPU): stage 1 (``rescaler_x16``), stage 2
(``enhancer_x16``), stage 3 (``joint_x16``) on SD 2.1-base, stage 2 on SDXL, and stage 2 with the 8-bit AdamW
when bitsandbytes is installed. Each case runs in its own process (its peak memory is its own; a failure or an
out-of-memory costs that case only), and does what Lightning does per optimiser step, without its loop:

- micro-steps: ``training_step`` under ``torch.autocast(bf16)`` and ``backward``;
- the optimiser step: the non-finite check (one host read per step, as in training), gradient clipping at the
  recipe's value, ``optimizer.step`` and ``zero_grad``.

After two warm-up micro-steps and one optimiser step, ``--micro-steps`` micro-steps and an optimiser step are
timed (CUDA synchronised): seconds per optimiser step = accumulate x the mean micro-step + the optimiser step.
Peak memory: ``torch.cuda.max_memory_allocated`` (tensors: what ``train_memory.py``'s CPU estimate counts) and
``max_memory_reserved`` (the caching allocator's), and the device memory in use at the end (``mem_get_info``:
the CUDA context and library workspaces included), over the timed steps.

    python benchmarks/gpu_training.py --device cuda --json $OUT/gpu_training.json --markdown $OUT/gpu_training.md
    .venv/bin/python benchmarks/gpu_training.py --device cpu --tiny --micro-steps 1   # the dry run (tiny twins)

``--tiny`` swaps the backbone for its tiny twin, 64-px crops and fp32: a check that every case builds and steps,
on a CPU, before GPU time is spent (``tests/test_benchmark_runner.py`` runs it for stage 2). Prints a table and one ``RESULT {json}`` line per case; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from case_runner import report, run_case  # noqa: E402

HARDWARE = "configs/hardware/one_gpu_24gb.yaml"
EXPERIMENTS = "configs/experiments"
#: case -> (configs composed in order, tiny twin preset); the first four are the issue's
CASES: dict[str, tuple[list[str], str]] = {
    "stage1-sd21": ([f"{EXPERIMENTS}/rescaler_x16.yaml", HARDWARE], "tiny-sd21"),
    "stage2-sd21": ([f"{EXPERIMENTS}/enhancer_x16.yaml", HARDWARE], "tiny-sd21"),
    "stage3-sd21": ([f"{EXPERIMENTS}/joint_x16.yaml", HARDWARE], "tiny-sd21"),
    "stage2-sdxl": (
        [f"{EXPERIMENTS}/enhancer_x16.yaml", "configs/backbone/sdxl.yaml", HARDWARE],
        "tiny-sdxl",
    ),
    "stage2-sd21-8bit": (
        [f"{EXPERIMENTS}/enhancer_x16.yaml", HARDWARE, "configs/hardware/adamw_8bit.yaml"],
        "tiny-sd21",
    ),
}
#: what the CPU estimated for stage 2 on SD 2.1-base (benchmarks/README.md "One-GPU recipe"): the tensor peak,
#: and GPU-hours per 10k optimiser steps at an assumed 35 % of each GPU's dense bf16 peak
CPU_ESTIMATE = {
    "stage2-sd21": {
        "tensor_peak_GiB": 11.37,
        "gpu_hours_per_10k": {"RTX 4090": 9.5, "A100": 5.0, "H100 SXM": 1.6},
    },
    "stage2-sd21-8bit": {"tensor_peak_GiB": 11.32},
}
GIB = 1024**3


def build(configs: list[str], args: argparse.Namespace, preset: str) -> Any:
    """tadm's CLI objects for the composed YAML (nothing runs), full-size random weights made on the device."""
    from train_memory import full_size_loader, step_only_args

    from tadm.commands.lightning import TADMCLI
    from tadm.config.plugins import load_plugins
    from tadm.evaluation.perceptual import vgg16_weights_path
    from tadm.testing.twins import twin_args
    from tadm.testing.twins.vgg16_stand_in import write_random_vgg16
    from tadm.training.lightning_module import TADMModule

    if not vgg16_weights_path().is_file():  # LPIPS / DISTS: a random VGG16 costs what the real one does
        home = Path(tempfile.mkdtemp(prefix="tadm-gpu-training-"))
        write_random_vgg16(home)
        os.environ["TORCH_HOME"] = str(home)
    if not args.tiny:
        full_size_loader(device=args.device)
    load_plugins()
    argv = [arg for config in configs for arg in ("--config", config)]
    if args.tiny:
        # fp32: a CPU without bf16 instructions emulates it (28 s per stage-2 micro-step instead of 1)
        argv += [*twin_args(preset), "--data.init_args.crop_size=64", "--trainer.precision=32-true"]
        argv += ["--model.rescaler.init_args.width=16", "--model.rescaler.init_args.num_resblocks=1"]
    argv += step_only_args()
    import lightning as L

    return TADMCLI(TADMModule, L.LightningDataModule, subclass_mode_data=True, run=False, args=argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one case on the device, step it, and return its numbers."""
    configs, preset = CASES[name]
    dev = torch.device(args.device)
    os.chdir(ROOT)  # the YAML paths are relative to the repository
    t0 = time.perf_counter()
    cli = build(configs, args, preset)
    model = cli.model
    model.to(dev)  # first: the backbone loads its parts onto its anchor's device
    model.configure_model()
    model.to(dev)
    build_s = time.perf_counter() - t0
    cfg = cli.config
    batch, crop = cfg["data"]["init_args"]["batch_size"], cfg["data"]["init_args"]["crop_size"]
    accumulate = int(cfg["trainer"]["accumulate_grad_batches"])
    clip = cfg["trainer"].get("gradient_clip_val")
    precision = str(cfg["trainer"]["precision"])
    backbone = model.backbone
    checkpointing = any(
        bool(getattr(part, "is_gradient_checkpointing", False))
        for part in (getattr(backbone, "unet", None), getattr(backbone, "vae", None))
        if part is not None
    )
    params = model.trainable_parameters()
    opt = model.optimizer_factory(params) if model.optimizer_factory else torch.optim.AdamW(params, lr=1e-4)
    model.train()
    torch.manual_seed(0)
    x = torch.rand(batch, 3, crop, crop, device=dev) * 2 - 1
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled="bf16" in precision)
    finite: list[bool] = []

    def micro_step() -> None:
        with autocast:
            loss = model.training_step({"image": x}, 0)
        loss.backward()

    def optimizer_step() -> None:
        finite.append(model.nonfinite.check_step(params, lambda ok: ok))  # one host read, as in training
        model.nonfinite.end_step()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    micro_step()
    optimizer_step()
    micro_step()
    sync(dev)
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.micro_steps):
        micro_step()
    sync(dev)
    micro_s = (time.perf_counter() - t0) / args.micro_steps
    t0 = time.perf_counter()
    optimizer_step()
    sync(dev)
    opt_s = time.perf_counter() - t0
    step_s = accumulate * micro_s + opt_s
    result: dict[str, Any] = {
        "case": name,
        "configs": configs,
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": precision,
        "micro_batch": batch,
        "crop": crop,
        "accumulate": accumulate,
        "gradient_checkpointing": checkpointing,
        "optimizer": type(opt).__module__ + "." + type(opt).__qualname__,
        "trainable_M": sum(p.numel() for p in params) / 1e6,
        "build_s": build_s,
        "warmup_s": warm_s,
        "micro_step_s": micro_s,
        "optimizer_step_s": opt_s,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "images_per_s": batch * accumulate / step_s,
        "gpu_hours_per_10k_steps": step_s * 10_000 / 3600,
        "finite_steps": sum(finite),
        "steps": len(finite),
    }
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        result |= {
            "peak_allocated_GiB": torch.cuda.max_memory_allocated(dev) / GIB,
            "peak_reserved_GiB": torch.cuda.max_memory_reserved(dev) / GIB,
            "device_used_GiB": (total - free) / GIB,
            "device_total_GiB": total / GIB,
        }
    return result


def markdown(rows: list[dict[str, Any]], failed: dict[str, str]) -> str:
    """The table benchmarks/README.md shows, with the CPU estimates beside the measurements."""
    head = (
        "| case | micro-batch x crop, accumulate | s / micro-step | s / optimiser step | steps / s | images / s | "
        "GPU-h / 10k steps | peak allocated GiB (CPU estimate) | peak reserved GiB | device in use GiB | finite |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        est = CPU_ESTIMATE.get(r["case"], {})
        peak = f"{r['peak_allocated_GiB']:.2f}" if "peak_allocated_GiB" in r else "-"
        if "tensor_peak_GiB" in est:
            peak += f" ({est['tensor_peak_GiB']:.2f})"
        hours = f"{r['gpu_hours_per_10k_steps']:.2f}"
        if "gpu_hours_per_10k" in est:
            hours += " (est. " + ", ".join(f"{g} {h:g}" for g, h in est["gpu_hours_per_10k"].items()) + ")"
        lines.append(
            f"| {r['case']} | {r['micro_batch']} x {r['crop']}, {r['accumulate']} | {r['micro_step_s']:.3f} | "
            f"{r['step_s']:.2f} | {r['steps_per_s']:.3f} | {r['images_per_s']:.2f} | {hours} | {peak} | "
            f"{r.get('peak_reserved_GiB', float('nan')):.2f} | {r.get('device_used_GiB', float('nan')):.2f} | "
            f"{r['finite_steps']}/{r['steps']} |"
        )
    lines += [f"| {case} | failed: {why} |" + " |" * 9 for case, why in failed.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--micro-steps", type=int, default=4, help="timed micro-steps per case (after warm-up)")
    ap.add_argument("--tiny", action="store_true", help="tiny twins and 64-px crops: the dry run")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per case")
    ap.add_argument("--json", default=None, help="write the rows here (after every case)")
    ap.add_argument("--markdown", default=None, help="write the table here (after every case)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        report(measure(args.case, args))
        return
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    passed = ["--device", args.device, "--micro-steps", str(args.micro_steps)] + (
        ["--tiny"] if args.tiny else []
    )
    for case in args.cases:
        if case.endswith("-8bit") and not _has("bitsandbytes"):
            failed[case] = "skipped: bitsandbytes is not installed"
            print(f"{case}: {failed[case]}", flush=True)
            continue
        t0 = time.perf_counter()
        result, why = run_case(__file__, case, args.timeout, passed)
        if result is None:
            failed[case] = why
            print(f"{case}: {why} ({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            rows.append(result)
            print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "failed": failed}, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(markdown(rows, failed) + "\n")
    print(markdown(rows, failed))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
