"""``tadm upscale`` with an IMPORTED release checkpoint vs a NATIVE tadm one (issue 10), on the full-size
SD 2.1 768-v architecture with random weights: wall time and peak RSS of each run, and their ratios.

    .venv/bin/python benchmarks/import_release.py --work /tmp/tadm-import-bench          # reruns reuse it
    .venv/bin/python benchmarks/import_release.py --work /tmp/tadm-import-bench --repeats 4 --alternate
    .venv/bin/python benchmarks/import_release.py --work /tmp/tadm-import-bench --repeats 0 --breakdown

What it does (every file is written once into ``--work`` and reused by later runs; without ``--work`` a
temporary folder is used and deleted at the end):

1. ``stable-diffusion-2-1/``: a diffusers ``save_pretrained`` folder of the full-size SD 2.1 768-v
   architecture with random weights: UNet (865.9 M, ``upcast_attention``, 1024-d context), VAE, OpenCLIP
   ViT-H text encoder in ``CLIPTextModel`` form (23 layers, 1024-d), the CLIP BPE tokenizer (the real
   49408-token vocab from the open-clip-torch wheel when ``--clip-bpe`` or an installed ``open_clip`` gives
   it, else a byte-level stand-in) and the v-prediction DDIM scheduler config; and ``sd-vae-ft-mse/``, a
   second VAE folder as the release uses (same architecture, other random weights).
2. ``release/dfrm_x16.pkl`` + ``release/model_sr_x16.pkl``: the authors' two files laid out key by key
   as the release writes them (``tests/helpers/release.py``: DFRM x16, UNet LoRA rank 48 and VAE-decoder
   LoRA rank 16 on the release's target modules, conv_in, TPM, Refiner), random values, ``torch.save``;
   then the real ``tadm import-release`` (subprocess) -> ``imported.safetensors`` (fp32, its default).
3. ``native/last.ckpt``: what ``tadm fit --config configs/experiments/enhancer_x16.yaml --config
   configs/backbone/sd21.yaml`` (tadm's own stage-2 recipe, release preset off) writes, on the same folder
   and at the same UNet LoRA rank 48, built with ``TADMModel.from_config`` and saved as
   ``TADMModule.on_save_checkpoint`` saves it (trained tensors + meta; no optimiser state, which ``tadm export``
   drops anyway); then the real ``tadm export --dtype fp32`` -> ``native.safetensors``: the same format,
   dtype and tensor shapes as the imported file. What differs is what the import stores: the release's
   variants in the config (LoRA alpha, ReLU TPM / Refiner, unscaled DFRM latents) and its VAE folder.
4. ``tadm upscale --ckpt C lr.png --output ... --backbone WORK/stable-diffusion-2-1`` of one 32x32 LR PNG
   (x16 -> 512x512), exactly the user's command, as a subprocess under ``OMP_NUM_THREADS=--threads``,
   INTERLEAVED native, imported, native, imported, ... (``--alternate``: imported first in even
   repeats; the CPU is shared, so each repeat's ratio is read within the repeat). Wall time, CPU time and
   peak RSS come from ``os.wait4`` on each child (its own ``ru_maxrss``). ``--breakdown`` adds one run of
   each in-process with timers around the phases of the same command (checkpoint read, backbone load,
   LoRA, trained-tensor load, and inside the upscale: DFRM, TPM, UNet, Refiner, VAE decoder).

Prints tables and the imported / native ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from import_release_files import (  # the build steps and helpers, beside this script
    BACKBONE_DIR,
    DONE,
    NATIVE_DIR,
    RELEASE_DIR,
    VAE_DIR,
    fail,
    gb,
    run_measured,
    step_backbone,
    step_native,
    step_release,
    tadm_cmd,
)

LR_SIZE = 32


def step_phases(ckpt: str, backbone: str, lr: str, output: str) -> dict[str, Any]:
    """The real ``tadm upscale`` in this process, with timers around its phases (nested ones included)."""
    import resource

    t_start = time.perf_counter()
    import tadm.inference.lr_files as lr_files
    import tadm.model.loading as load_mod
    from tadm.commands.main import main
    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
    from tadm.inference.codec import Codec
    from tadm.model import TADMModel

    order = ["imports", "read checkpoint", "build model (all below)", "  backbone weights (incl. prompt)"]
    order += ["    empty prompt", "  LoRA layers", "load trained tensors", "model id hash"]
    order += [
        "upscale 512x512 (parts below)",
        "  DFRM upscale",
        "  TPM",
        "  UNet",
        "  Refiner",
        "  VAE decoder",
    ]
    phases: dict[str, float] = dict.fromkeys(order, 0.0)  # printed in this order
    phases["imports"] = time.perf_counter() - t_start
    rss: dict[str, float] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
                rss[label] = gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

        setattr(owner, name, wrapper)

    timed(load_mod, "read_checkpoint", "read checkpoint")
    timed(TADMModel, "from_config", "build model (all below)")
    timed(StableDiffusionBackbone, "load", "  backbone weights (incl. prompt)")
    timed(StableDiffusionBackbone, "_encode_empty_prompt", "    empty prompt")
    timed(StableDiffusionBackbone, "_add_lora", "  LoRA layers")
    timed(TADMModel, "load_trained_state", "load trained tensors")
    timed(load_mod, "tensor_hash", "model id hash")
    timed(Codec, "upscale", "upscale 512x512 (parts below)")
    timed(lr_files, "write_png", "write PNG")
    codec_init = Codec.__init__

    def codec_with_part_timers(self: Any, module: Any, *args: Any, **kwargs: Any) -> None:
        codec_init(self, module, *args, **kwargs)
        b = module.backbone  # forward time of each network inside the upscale (summed over tiles)
        for label, part in (
            ("  UNet", b.unet),
            ("  VAE decoder", b.vae.decoder),
            ("  TPM", module.aligner),
            ("  Refiner", module.enhancer.refiner),
        ):
            part.forward = timed_call(part.forward, label)
        module.rescaler.upscale = timed_call(module.rescaler.upscale, "  DFRM upscale")

    def timed_call(fn: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    Codec.__init__ = codec_with_part_timers  # type: ignore[method-assign]
    rc = main(["upscale", "--ckpt", ckpt, lr, "--output", output, "--backbone", backbone, "--overwrite"])
    phases["total"] = time.perf_counter() - t_start
    return {"rc": rc, "phases": phases, "rss_after_gb": rss}


# --------------------------------------------------------------------------------------- the driver
def sub_step(work: Path, step: str, extra: list[str], log: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--work", str(work), "--step", step, *extra]
    res = run_measured(cmd, log)
    if res["rc"] != 0:
        fail(f"step {step}", res, log)
    out = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    return {**res, **json.loads(out[-1][7:])}


def write_lr_png(path: Path) -> None:
    """A 32x32 RGB PNG without tadm metadata (upscale assumes the checkpoint's scale: 512x512)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:LR_SIZE, 0:LR_SIZE] / (LR_SIZE - 1)
    img = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 12, (LR_SIZE, LR_SIZE, 3)) + 20
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def check_output(folder: Path) -> str:
    """The one PNG ``tadm upscale`` wrote into ``folder``: its size and value spread (a sanity check)."""
    import numpy as np
    from PIL import Image

    (path,) = folder.glob("*.png")
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return f"{a.shape[1]}x{a.shape[0]}, mean {a.mean():.1f}, std {a.std():.1f}"


def drive(args: argparse.Namespace) -> None:
    import torch

    temp = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="tadm-import-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    free = shutil.disk_usage(work).free / 1e9
    print(f"work folder {work} ({free:.0f} GB free; needs ~6 GB)", flush=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, timed runs with OMP_NUM_THREADS={args.threads}")
    prep: dict[str, Any] = {}
    try:
        # 1-3: build once, reuse afterwards
        if not (work / BACKBONE_DIR / DONE).exists() or not (work / VAE_DIR / DONE).exists():
            print("writing the full-size SD 2.1 768-v folder (random weights) ...", flush=True)
            extra = ["--clip-bpe", args.clip_bpe] if args.clip_bpe else []
            prep["backbone"] = sub_step(work, "backbone", extra, logs / "step_backbone.log")
        if not (work / RELEASE_DIR / DONE).exists():
            print("writing release-layout dfrm_x16.pkl + model_sr_x16.pkl ...", flush=True)
            prep["release"] = sub_step(work, "release", [], logs / "step_release.log")
        imported = work / "imported.safetensors"
        if not imported.exists():
            print("tadm import-release ...", flush=True)
            cmd = [*tadm_cmd(), "import-release", "--dfrm", str(work / RELEASE_DIR / "dfrm_x16.pkl")]
            cmd += ["--tadm", str(work / RELEASE_DIR / "model_sr_x16.pkl"), "--output", str(imported)]
            cmd += ["--backbone-pretrained", str(work / BACKBONE_DIR), "--vae", str(work / VAE_DIR)]
            res = run_measured(cmd, logs / "import_release.log")
            if res["rc"]:
                fail("tadm import-release", res, logs / "import_release.log")
            prep["import-release"] = res
        if not (work / NATIVE_DIR / DONE).exists():
            print("native stage-2 checkpoint (tadm recipe, release preset off) ...", flush=True)
            prep["native"] = sub_step(work, "native", [], logs / "step_native.log")
        native = work / "native.safetensors"
        if not native.exists():
            cmd = [*tadm_cmd(), "export", str(work / NATIVE_DIR / "last.ckpt"), "--output", str(native)]
            res = run_measured([*cmd, "--dtype", "fp32"], logs / "export.log")
            if res["rc"]:
                fail("tadm export", res, logs / "export.log")
            prep["export"] = res
        for name, res in prep.items():
            extra = {
                k: v for k, v in res.items() if k not in ("rc", "wall_s", "peak_rss_gb", "user_s", "sys_s")
            }
            print(f"  {name}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB {extra or ''}")
        ckpts = {"native": native, "imported": imported}
        for name, path in ckpts.items():
            print(f"  {name}: {path.name} {path.stat().st_size / 1e6:.1f} MB")

        # 4: the timed runs, interleaved
        lr = work / "lr.png"
        write_lr_png(lr)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env["HF_HUB_OFFLINE"] = "1"
        runs: list[dict[str, Any]] = []
        for rep in range(1, args.repeats + 1):
            pair = ("native", "imported")
            for name in pair[::-1] if args.alternate and rep % 2 == 0 else pair:
                out = work / "out" / f"{name}-{rep}"
                cmd = [*tadm_cmd(), "upscale", "--ckpt", str(ckpts[name]), str(lr), "--output", str(out)]
                cmd += ["--backbone", str(work / BACKBONE_DIR), "--overwrite"]
                log = logs / f"upscale_{name}_{rep}.log"
                res = run_measured(cmd, log, env)
                if res["rc"]:
                    fail(f"tadm upscale ({name}, repeat {rep})", res, log)
                res.update(name=name, repeat=rep, output=check_output(out))
                runs.append(res)
                print(
                    f"  repeat {rep} {name:<8} {res['wall_s']:7.1f} s  peak RSS {res['peak_rss_gb']:.2f} GB  "
                    f"(user {res['user_s']:.0f} s, sys {res['sys_s']:.0f} s; output {res['output']})",
                    flush=True,
                )
        if runs:
            report(runs, args.repeats)

        if args.breakdown:
            print("\nbreakdown (one in-process run each, same command, timers around its phases):")
            results = {}
            for name in ("native", "imported"):
                out = work / "out" / f"{name}-phases"
                extra = ["--ckpt", str(ckpts[name]), "--lr", str(lr), "--output", str(out)]
                sub = [sys.executable, __file__, "--work", str(work), "--step", "phases", *extra]
                log = logs / f"phases_{name}.log"
                res = run_measured(sub, log, env)
                if res["rc"]:
                    fail(f"breakdown ({name})", res, log)
                line = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")][-1]
                results[name] = {**res, **json.loads(line[7:])}
            labels = list(results["native"]["phases"])
            print("| phase | native s | imported s | peak RSS so far, native GB | imported GB |")
            print("|---|---|---|---|---|")
            for label in labels:
                n, i = results["native"], results["imported"]
                print(
                    f"| {label} | {n['phases'][label]:.2f} | {i['phases'].get(label, float('nan')):.2f} | "
                    f"{n['rss_after_gb'].get(label, float('nan')):.2f} | "
                    f"{i['rss_after_gb'].get(label, float('nan')):.2f} |"
                )
            print(
                f"| peak RSS | | | {results['native']['peak_rss_gb']:.2f} | {results['imported']['peak_rss_gb']:.2f} |"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"prep": prep, "runs": runs}, indent=1))
    finally:
        if temp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: list[dict[str, Any]], repeats: int) -> None:
    """Per repeat: wall s, CPU s (user + sys: less sensitive to other jobs on the CPU), peak RSS, ratios."""
    for r in runs:
        r["cpu_s"] = r["user_s"] + r["sys_s"]
    print("\n| repeat | native s | imported s | ratio | native CPU s | imported CPU s | ratio "
          "| native peak RSS GB | imported GB | ratio |")  # fmt: skip
    print("|---" * 10 + "|")
    ratios: dict[str, list[float]] = {"wall_s": [], "cpu_s": [], "peak_rss_gb": []}
    for rep in range(1, repeats + 1):
        n = next(r for r in runs if r["repeat"] == rep and r["name"] == "native")
        i = next(r for r in runs if r["repeat"] == rep and r["name"] == "imported")
        cells = []
        for key, fmt in (("wall_s", ".1f"), ("cpu_s", ".1f"), ("peak_rss_gb", ".2f")):
            ratios[key].append(i[key] / n[key])
            cells.append(f"{n[key]:{fmt}} | {i[key]:{fmt}} | {ratios[key][-1]:.3f}")
        print(f"| {rep} | {' | '.join(cells)} |")
    cells, summary = [], []
    for key, fmt, what in (
        ("wall_s", ".1f", "time"),
        ("cpu_s", ".1f", "CPU time"),
        ("peak_rss_gb", ".2f", "peak RSS"),
    ):
        n = statistics.mean(r[key] for r in runs if r["name"] == "native")
        i = statistics.mean(r[key] for r in runs if r["name"] == "imported")
        cells.append(f"{n:{fmt}} | {i:{fmt}} | {i / n:.3f}")
        summary.append(
            f"{what} {i / n:.3f} (median of the repeats' ratios {statistics.median(ratios[key]):.3f}; "
            f"each {', '.join(f'{r:.3f}' for r in ratios[key])})"
        )
    print(f"| mean | {' | '.join(cells)} |")
    cells = []
    for key, fmt in (("wall_s", ".1f"), ("cpu_s", ".1f"), ("peak_rss_gb", ".2f")):
        n = min(r[key] for r in runs if r["name"] == "native")
        i = min(r[key] for r in runs if r["name"] == "imported")
        cells.append(f"{n:{fmt}} | {i:{fmt}} | {i / n:.3f}")
    print(f"| min (least disturbed) | {' | '.join(cells)} |")
    print("\nimported / native (ratio of the means; bound 1.10):\n  " + "\n  ".join(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", help="folder for the model files (reused when it holds them; default: a temp dir)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="interleaved native/imported pairs (default 2; 0 with --breakdown: the breakdown only)",
    )
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the timed runs (default 2)")
    ap.add_argument(
        "--alternate", action="store_true", help="run even repeats imported first (ABBA: cancels a drift)"
    )
    ap.add_argument(
        "--clip-bpe", help="open_clip's bpe_simple_vocab_16e6.txt.gz, or the open-clip-torch wheel"
    )
    ap.add_argument("--breakdown", action="store_true", help="also time the phases of one run of each")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--json", help="also write the measurements to this file")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: one preparation step in this process
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--lr", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step is None:
        drive(args)
        return
    work = Path(args.work)
    if args.step == "backbone":
        result = step_backbone(work, args.clip_bpe)
    elif args.step == "release":
        result = step_release(work)
    elif args.step == "native":
        result = step_native(work)
    elif args.step == "phases":
        result = step_phases(args.ckpt, str(work / BACKBONE_DIR), args.lr, args.output)
    else:
        raise SystemExit(f"unknown step {args.step!r}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
