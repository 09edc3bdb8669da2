"""Tiny random twins of the SD 3.x and FLUX.1 presets, for tests and CPU runs.

A ``tiny-*`` DiT preset (:mod:`tadm.components.backbones.dit_presets`) builds the same module classes as
the real variant (``SD3Transformer2DModel`` with SD 3.5's dual attention and RMS q/k norm, or
``FluxTransformer2DModel`` with a guidance embedding; a 16-channel ``AutoencoderKL`` with scaling and
shift factor; CLIP-L/G and T5 encoders with their tokenizers; ``FlowMatchEulerDiscreteScheduler``) with
random weights and a few thousand parameters. :func:`save_tiny_dit_pipeline` writes them through the real
pipeline class, so tests exercise ``from_pretrained`` on a diffusers folder too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tadm.components.backbones.dit_presets import DiTPreset, get_dit_preset
from tadm.components.backbones.tiny import TINY_PARTS as TINY_PARTS
from tadm.components.backbones.tiny import TINY_TEXT, TINY_VAE, seeded, tiny_parts, tiny_tokenizer

#: T5 width; the transformers' joint_attention_dim (CLIP-L + CLIP-G hidden states, 2 x 32, are padded to it)
TINY_T5_DIM = 64
TINY_T5 = dict(
    d_model=TINY_T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
)
TINY_SD3 = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=TINY_T5_DIM,
    caption_projection_dim=16,  # = heads x head dim, as 1536 = 24 x 64 in SD 3.5 Medium
    pooled_projection_dim=64,  # CLIP-L + CLIP-G projections (32 + 32), as 768 + 1280
    out_channels=16,
    pos_embed_max_size=48,
    dual_attention_layers=(0,),  # SD 3.5 Medium's MMDiT-X blocks
    qk_norm="rms_norm",
)
TINY_FLUX = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=TINY_T5_DIM,
    pooled_projection_dim=32,  # CLIP-L's pooled output (its hidden size), as 768
    axes_dims_rope=(2, 2, 4),  # sums to the head dim, as (16, 56, 56) -> 128
)
TINY_SCHEDULERS: dict[str, dict[str, Any]] = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}


def tiny_t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer (pad 0, eos 1, unk 2, lower-case letters, the word marker): 30 ids.

    Built from a ``tokenizers`` object, so no sentencepiece model is needed; "" encodes to [eos] as T5's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(97, 123)]
    vocab.append(("\u2581", -1.0))
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    with tempfile.TemporaryDirectory(
        prefix="tadm-tiny-t5-"
    ) as tmp:  # a saved-and-loaded tokenizer, as a folder gives
        tok.save_pretrained(tmp)
        tok = T5TokenizerFast.from_pretrained(tmp, model_max_length=512)
    if tok("").input_ids != [1]:
        raise RuntimeError(f"tiny T5 tokenizer came out broken: '' -> {tok('').input_ids}")
    return tok


def _clip(seed: int, projection: bool) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    specials = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = CLIPTextConfig(**TINY_TEXT, **specials, hidden_act="quick_gelu", projection_dim=32)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return seeded(seed, lambda: cls(cfg)), tok


def build_tiny_dit_components(
    preset: str | DiTPreset, parts: Iterable[str] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Random tiny modules of a ``tiny-*`` DiT preset, keyed like its diffusers pipeline's components.

    ``vae``; ``unet`` brings ``transformer`` and ``scheduler``; ``text`` brings the text encoders and
    tokenizers (SD 3: ``text_encoder`` .. ``text_encoder_3``; FLUX: ``text_encoder``, ``text_encoder_2``).
    Each module is seeded on its own, and the global RNG is left as it was.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    p = get_dit_preset(preset)
    wanted = tiny_parts(p, parts)
    base = p.seed if seed is None else seed
    out: dict[str, Any] = {}
    if "vae" in wanted:
        cfg = dict(
            TINY_VAE, latent_channels=p.latent_channels, use_quant_conv=False, use_post_quant_conv=False
        )
        out["vae"] = seeded(
            base + 1,
            lambda: AutoencoderKL(**cfg, scaling_factor=p.scaling_factor, shift_factor=p.shift_factor),
        )
    if "unet" in wanted:
        if p.family == "sd3":
            out["transformer"] = seeded(base + 2, lambda: SD3Transformer2DModel(**TINY_SD3))
        else:
            flux = dict(TINY_FLUX, guidance_embeds=p.tiny_guidance_embeds)
            out["transformer"] = seeded(base + 2, lambda: FluxTransformer2DModel(**flux))
        out["scheduler"] = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULERS[p.family])
    if "text" in wanted:
        t5_tok = tiny_t5_tokenizer()
        t5_cfg = T5Config(
            **TINY_T5, vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0
        )
        t5 = seeded(base + 5, lambda: T5EncoderModel(t5_cfg))
        if p.family == "sd3":
            out["text_encoder"], out["tokenizer"] = _clip(base + 3, projection=True)
            out["text_encoder_2"], out["tokenizer_2"] = _clip(base + 4, projection=True)
            out["text_encoder_3"], out["tokenizer_3"] = t5, t5_tok
        else:
            out["text_encoder"], out["tokenizer"] = _clip(base + 3, projection=False)
            out["text_encoder_2"], out["tokenizer_2"] = t5, t5_tok
    return out


def save_tiny_dit_pipeline(preset: str | DiTPreset, folder: str | Path, seed: int | None = None) -> Path:
    """Write a tiny DiT preset as a diffusers pipeline folder through ``StableDiffusion3Pipeline`` /
    ``FluxPipeline``, so the folder loads with ``from_pretrained`` like a real download."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    p = get_dit_preset(preset)
    comps = build_tiny_dit_components(p, seed=seed)
    pipe = StableDiffusion3Pipeline(**comps) if p.family == "sd3" else FluxPipeline(**comps)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
