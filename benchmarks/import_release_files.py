"""The files ``benchmarks/import_release.py`` measures with, each written once into its work folder: the
full-size SD 2.1 768-v backbone with random weights, the release-layout files and their import, and a native
tadm checkpoint of the same architecture; plus the subprocess and folder helpers they share.

Run ``benchmarks/import_release.py``; this module only holds its build steps (kept apart so that neither
file passes 500 lines).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKBONE_DIR, VAE_DIR, RELEASE_DIR, NATIVE_DIR = "stable-diffusion-2-1", "sd-vae-ft-mse", "release", "native"
SCALE = 16  # the release files measured: x16
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
