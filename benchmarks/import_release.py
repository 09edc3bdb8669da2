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
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKBONE_DIR, VAE_DIR, RELEASE_DIR, NATIVE_DIR = "stable-diffusion-2-1", "sd-vae-ft-mse", "release", "native"
DONE = "tadm-benchmark-done.json"  # written last into a finished folder: its presence means "reuse"
#: stabilityai/stable-diffusion-2-1 (768-v): the 2.1-base UNet at sample size 96 with attention upcast
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as the real text_encoder/config.json has them
)  # fmt: skip
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip
LR_SIZE, SCALE = 32, 16


# ------------------------------------------------------------------------------------------ helpers
def gb(kib: float) -> float:
    return kib / 1024**2


def atomic_folder(final: Path, build: Any) -> float:
    """``build(tmp)`` into a sibling temp folder, then rename it to ``final``; returns the seconds taken."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    seconds = time.perf_counter() - t0
    (tmp / DONE).write_text(json.dumps({"seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M")}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return seconds


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds and the child's own peak RSS (``os.wait4``: its rusage, not the sum of all
    children's), with stdout + stderr in ``log``."""
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB on Linux
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_gb": gb(usage.ru_maxrss / scale),
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }


def tadm_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "tadm"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tadm"]


def fail(what: str, res: dict[str, Any], log: Path) -> None:
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    sys.exit(f"{what} failed (exit {res['rc']}); log {log}:\n{tail}")


# ------------------------------------------------------------------------------- 1. backbone folders
def clip_tokenizer(bpe: str | None, folder: Path) -> tuple[Any, str]:
    """SD 2.1's tokenizer (CLIP BPE, pad '!'), from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (given as
    the .gz, the open-clip-torch wheel, or found in an installed ``open_clip``); else a byte-level stand-in."""
    from transformers import CLIPTokenizer

    from tadm.testing.twins.random_text_encoders import _bytes_to_unicode, tiny_tokenizer

    raw: bytes | None = None
    member = "open_clip/bpe_simple_vocab_16e6.txt.gz"
    if bpe and bpe.endswith(".whl"):
        with zipfile.ZipFile(bpe) as whl:
            raw = whl.read(member)
    elif bpe:
        raw = Path(bpe).read_bytes()
    else:
        try:
            import open_clip  # type: ignore[import-not-found]

            raw = (Path(open_clip.__file__).parent / Path(member).name).read_bytes()
        except (ImportError, OSError):
            raw = None
    if raw is None:
        return tiny_tokenizer(pad_token="!"), "byte-level stand-in (514 tokens; no CLIP BPE vocab given)"
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # as open_clip's SimpleTokenizer
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(folder, pad_token="!", model_max_length=77)
    ids = tok("a photo").input_ids
    if len(tok) != 49408 or ids[0] != 49406 or ids[-1] != 49407 or len(ids) != 4:
        raise RuntimeError(f"CLIP tokenizer came out wrong: {len(tok)} tokens, 'a photo' -> {ids}")
    return tok, "CLIP BPE (49408 tokens, open_clip's bpe_simple_vocab_16e6)"


def step_backbone(work: Path, bpe: str | None) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS, FULL_SIZE_VAE

    info: dict[str, Any] = {}

    def pipeline(tmp: Path) -> None:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            **{**FULL_SIZE_UNETS["sd21-base"], "sample_size": 96, "upcast_attention": True}
        )
        vae = AutoencoderKL(**{**FULL_SIZE_VAE, "sample_size": 768}, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
        tok, info["tokenizer"] = clip_tokenizer(bpe, tmp / "_tok")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tok,
            unet=unet,
            scheduler=DDIMScheduler(**SD21_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_tok")
        info["unet_M"] = sum(p.numel() for p in unet.parameters()) / 1e6
        info["text_encoder_M"] = sum(p.numel() for p in text.parameters()) / 1e6
        info["vae_M"] = sum(p.numel() for p in vae.parameters()) / 1e6

    def ft_mse(tmp: Path) -> None:  # stabilityai/sd-vae-ft-mse: the same AutoencoderKL, its own weights
        torch.manual_seed(1)
        AutoencoderKL(**{**FULL_SIZE_VAE, "sample_size": 256}).save_pretrained(tmp, safe_serialization=True)

    info["pipeline_s"] = atomic_folder(work / BACKBONE_DIR, pipeline)
    info["vae_s"] = atomic_folder(work / VAE_DIR, ft_mse)
    return info


# ------------------------------------------------------------------------- 2. release-layout files
def step_release(work: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sys.path.insert(0, str(ROOT))  # tests.helpers: the release's key names and shapes, written once
    from tests.helpers.release import release_dfrm_state, release_tadm_state

    src = work / BACKBONE_DIR
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(work / VAE_DIR)

    def write(tmp: Path) -> None:
        torch.save({"state_dict": release_dfrm_state(SCALE)}, tmp / f"dfrm_x{SCALE}.pkl")  # DFRM.save_model
        torch.save(release_tadm_state(unet, vae, rank_unet=48, rank_vae=16), tmp / f"model_sr_x{SCALE}.pkl")

    seconds = atomic_folder(work / RELEASE_DIR, write)
    files = {p.name: p.stat().st_size / 1e6 for p in (work / RELEASE_DIR).glob("*.pkl")}
    return {"seconds": seconds, "files_MB": files}


# ---------------------------------------------------------------------------- 3. native checkpoint
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose YAML configs as ``tadm fit --config A --config B`` does: dicts merge, other values replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def native_config(work: Path) -> str:
    import yaml

    cfg: dict[str, Any] = {}
    for name in ("experiments/enhancer_x16.yaml", "backbone/sd21.yaml"):
        cfg = merge(cfg, yaml.safe_load((ROOT / "configs" / name).read_text(encoding="utf-8")))
    over = {"pretrained": str(work / BACKBONE_DIR), "unet_lora_rank": 48}  # the release's rank: same sizes
    cfg = merge(cfg, {"model": {"backbone": {"init_args": over}}})
    return yaml.safe_dump(cfg, sort_keys=False)


def step_native(work: Path) -> dict[str, Any]:
    import lightning as L
    import torch

    from tadm.model import TADMModel

    config = native_config(work)
    module = TADMModel.from_config(config, "benchmark native model")  # as the codec builds it
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "trained": the zero-initialised tensors (LoRA B, Refiner tail) made non-zero
        for p in module.trainable_parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
        # what TADMModule.on_save_checkpoint stores: the trained tensors (no frozen backbone) and the meta
        "state_dict": {k: v for k, v in module.state_dict().items() if k not in module.frozen_keys()},
        "tadm": module.checkpoint_meta(config),
    }

    def write(tmp: Path) -> None:
        torch.save(checkpoint, tmp / "last.ckpt")

    seconds = atomic_folder(work / NATIVE_DIR, write)
    return {"seconds": seconds, "ckpt_MB": (work / NATIVE_DIR / "last.ckpt").stat().st_size / 1e6}


# ------------------------------------------------------------------------- breakdown of one upscale
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
