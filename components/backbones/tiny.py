"""Tiny random twins of the Stable Diffusion presets, for tests and CPU runs.

A ``tiny-*`` preset (see :mod:`tadm.components.backbones.presets`) builds the same
diffusers/transformers module classes as the real variant of its family, with random weights and a
few thousand parameters, so every code path (including ``from_pretrained`` on a saved folder, see
:func:`save_tiny_pipeline`) runs on a CPU in seconds. Weights are seeded per module, so they are
reproducible and independent of which other parts were built.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tadm.components.backbones.presets import Preset, get_preset

#: what ``build_tiny_components(parts=...)`` accepts ("unet" brings the scheduler)
TINY_PARTS = ("vae", "unet", "text")

# VAE: four blocks because the rescaler relies on the real VAE's factor 8 = 2**(4-1); 8 groups
# so 16/32 channels are legal; one layer per block keeps a 64x64 encode/decode around 10 ms.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
# UNet: two levels, one cross-attention level, 2/4 heads; mirrors diffusers' own test configs.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    norm_num_groups=32,
)
TINY_UNET_FAMILY: dict[str, dict[str, Any]] = {
    "sd15": dict(cross_attention_dim=32),
    "sd21": dict(cross_attention_dim=32, use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32), as 768 + 1280 in SDXL
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text_embeds (32)
    ),
}
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)
# SD1.x uses OpenAI CLIP (quick_gelu, pad = eos); SD2.x / SDXL's second encoder use OpenCLIP (gelu, pad "!").
TINY_TEXT_ACT = {"sd15": "quick_gelu", "sd21": "gelu", "sdxl": "quick_gelu"}
TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode table; the first 256 vocab entries."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_tokenizer(pad_token: str | None = None) -> Any:
    """A CLIP BPE tokenizer with the byte alphabet, no merges and the two CLIP specials (514 ids).

    transformers 5's ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds an empty
    tokenizer, so the files are written to a folder and loaded with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kwargs: dict[str, Any] = {"model_max_length": 77}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    with tempfile.TemporaryDirectory(prefix="tadm-tiny-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, **kwargs)
    ids = tok("").input_ids
    if len(tok) != len(vocab) or ids != [vocab["<|startoftext|>"], vocab["<|endoftext|>"]]:
        raise RuntimeError(f"tiny CLIP tokenizer came out broken: {len(tok)} tokens, '' -> {ids}")
    return tok


def seeded(seed: int, build: Any) -> Any:
    """Run ``build()`` under ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_parts(preset: Any, parts: Iterable[str] | None) -> set[str]:
    """The ``parts`` (default: all of :data:`TINY_PARTS`) to build for ``preset``, an SD or DiT preset;
    a preset that is not tiny, or an unknown part, is an error."""
    if not preset.tiny:
        raise ValueError(f"preset {preset.name!r} is not a tiny preset; load it with from_pretrained instead")
    wanted = set(TINY_PARTS if parts is None else parts)
    unknown = wanted - set(TINY_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {list(TINY_PARTS)}")
    return wanted


def build_tiny_components(
    preset: str | Preset, parts: Iterable[str] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Random tiny modules of a ``tiny-*`` preset, keyed like a diffusers pipeline's components.

    Returns ``vae``, ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer`` (and
    ``text_encoder_2``, ``tokenizer_2`` for SDXL), or only those of ``parts`` (``vae``, ``unet``
    -- which brings the scheduler -- and ``text``). Each module is seeded on its own (``seed``,
    default the preset's, plus a fixed offset), so its weights do not depend on which other
    parts were built, and the global RNG is left as it was.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = get_preset(preset)
    wanted = tiny_parts(p, parts)
    base = p.seed if seed is None else seed
    out: dict[str, Any] = {}

    if "vae" in wanted:
        vae = seeded(base + 1, lambda: AutoencoderKL(**TINY_VAE, scaling_factor=p.scaling_factor))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if factor != p.downsample_factor or vae.config.latent_channels != p.latent_channels:
            raise RuntimeError(f"tiny VAE gives factor {factor}, expected {p.downsample_factor}")
        out["vae"] = vae

    if "unet" in wanted:
        cfg = {**TINY_UNET, **TINY_UNET_FAMILY[p.family]}
        out["unet"] = seeded(base + 2, lambda: UNet2DConditionModel(**cfg))
        # the scheduler classes the real folders ship (PNDM, DDIM for 2.1 v-pred, Euler for SDXL)
        sched_cls = {"sd15": PNDMScheduler, "sd21": DDIMScheduler, "sdxl": EulerDiscreteScheduler}[p.family]
        sched_cfg = dict(TINY_SCHEDULER, prediction_type=p.tiny_prediction_type)
        if sched_cls is PNDMScheduler:
            sched_cfg.pop("clip_sample")
            sched_cfg["skip_prk_steps"] = True
        if sched_cls is EulerDiscreteScheduler:
            sched_cfg = {k: v for k, v in sched_cfg.items() if k not in ("clip_sample", "set_alpha_to_one")}
        out["scheduler"] = sched_cls(**sched_cfg)

    if "text" in wanted:
        tok = tiny_tokenizer(pad_token="!" if p.family == "sd21" else None)
        specials = dict(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cfg1 = CLIPTextConfig(**TINY_TEXT, **specials, hidden_act=TINY_TEXT_ACT[p.family])
        out["text_encoder"] = seeded(base + 3, lambda: CLIPTextModel(cfg1))
        out["tokenizer"] = tok
        if p.family == "sdxl":
            tok2 = tiny_tokenizer(pad_token="!")
            specials2 = dict(specials, pad_token_id=tok2.pad_token_id)
            cfg2 = CLIPTextConfig(**TINY_TEXT, **specials2, hidden_act="gelu", projection_dim=32)
            out["text_encoder_2"] = seeded(base + 4, lambda: CLIPTextModelWithProjection(cfg2))
            out["tokenizer_2"] = tok2
    return out


def save_tiny_pipeline(preset: str | Preset, folder: str | Path, seed: int | None = None) -> Path:
    """Write a tiny preset as a diffusers pipeline folder (``model_index.json``, ``vae/``, ...).

    Saving through the real pipeline class makes the folder loadable by ``from_pretrained`` and
    by ``StableDiffusion(XL)Pipeline`` alike, so tests exercise the real loading path.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = get_preset(preset)
    comps = build_tiny_components(p, seed=seed)
    if p.family == "sdxl":
        pipe = StableDiffusionXLPipeline(**comps)
    else:
        pipe = StableDiffusionPipeline(
            **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_vae(preset: str | Preset, folder: str | Path, seed: int | None = None) -> Path:
    """Write only a tiny VAE at the folder's root, laid out like ``stabilityai/sd-vae-ft-mse``."""
    vae = build_tiny_components(preset, parts=["vae"], seed=seed)["vae"]
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder
