"""Random tiny twins of the SD 3.x and FLUX.1 families, for tests and CPU runs.

:class:`SD3Twin` and :class:`FluxTwin` are the real backbones whose parts are built with random weights and
a few thousand parameters, from the same module classes as the real variant (``SD3Transformer2DModel``
with SD 3.5's dual attention and RMS q/k norm, or ``FluxTransformer2DModel`` with a guidance embedding; a
16-channel ``AutoencoderKL`` with scaling and shift factor; CLIP-L/G and T5 encoders with their tokenizers;
``FlowMatchEulerDiscreteScheduler``). :func:`save_tiny_dit_pipeline` writes them through the real pipeline
class, so tests exercise ``from_pretrained`` on a diffusers folder too. Choose one in YAML by its class
path, e.g. ``--model.backbone=tadm.testing.twins.flow_twins.FluxTwin``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tadm.components.backbones.diffusers_base.variants import find_variant
from tadm.components.backbones.flow_transformers import FluxBackbone, SD3Backbone
from tadm.components.backbones.flow_transformers.flow_presets import FlowPreset
from tadm.components.backbones.flow_transformers.flow_weight_loading import DTYPE_PARTS
from tadm.testing.twins.random_text_encoders import tiny_clip, tiny_t5_tokenizer
from tadm.testing.twins.twin_weights import RandomWeights, seeded
from tadm.testing.twins.unet_twins import TINY_PARTS as TINY_PARTS
from tadm.testing.twins.unet_twins import tiny_vae, twin_parts

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


#: both CLIPs of the flow families: OpenAI CLIP's activation, 32-d projections (as 768 / 1280)
CLIP: dict[str, Any] = dict(hidden_act="quick_gelu", projection_dim=32)


@dataclass(frozen=True)
class FlowTwinPreset(FlowPreset):
    """A tiny look-alike of SD 3.x / FLUX.1: whether the FLUX transformer has a guidance embedding
    (FLUX.1-dev does) and the base seed of its random weights (each module gets its own offset)."""

    resolution: int = 64
    max_sequence_length: int = 8
    guidance_embeds: bool = False
    seed: int = 0


TWIN_PRESETS: dict[str, FlowTwinPreset] = {
    p.name: p
    for p in (
        FlowTwinPreset(
            "tiny-sd3",
            "sd3",
            None,
            description="random tiny SD 3.5 look-alike for tests (MMDiT-X dual attention, three text encoders)",
            seed=3500,
        ),
        FlowTwinPreset(
            "tiny-flux",
            "flux",
            None,
            description="random tiny FLUX.1-dev look-alike for tests (packed 2x2 latents, guidance embedding)",
            scaling_factor=0.3611,
            shift_factor=0.1159,
            guidance_embeds=True,
            seed=1100,
        ),
    )
}


def get_flow_twin_preset(name: str | FlowTwinPreset, family: str | None = None) -> FlowTwinPreset:
    """A twin preset by name (and of ``family``), with the known names in the error."""
    return find_variant(TWIN_PRESETS, name, family)


def build_tiny_dit_components(
    preset: str | FlowTwinPreset, parts: Iterable[str] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Random tiny modules of a ``tiny-*`` DiT preset, keyed like its diffusers pipeline's components.

    ``vae``; ``unet`` brings ``transformer`` and ``scheduler``; ``text`` brings the text encoders and
    tokenizers (SD 3: ``text_encoder`` .. ``text_encoder_3``; FLUX: ``text_encoder``, ``text_encoder_2``).
    Each module is seeded on its own, and the global RNG is left as it was.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    p = get_flow_twin_preset(preset)
    wanted = twin_parts(parts)
    base = p.seed if seed is None else seed
    out: dict[str, Any] = {}
    if "vae" in wanted:
        out["vae"] = tiny_vae(p, base + 1, use_quant_conv=False, use_post_quant_conv=False)
    if "unet" in wanted:
        if p.family == "sd3":
            out["transformer"] = seeded(base + 2, lambda: SD3Transformer2DModel(**TINY_SD3))
        else:
            flux = dict(TINY_FLUX, guidance_embeds=p.guidance_embeds)
            out["transformer"] = seeded(base + 2, lambda: FluxTransformer2DModel(**flux))
        out["scheduler"] = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULERS[p.family])
    if "text" in wanted:
        t5_tok = tiny_t5_tokenizer()
        t5_cfg = T5Config(
            **TINY_T5, vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0
        )
        t5 = seeded(base + 5, lambda: T5EncoderModel(t5_cfg))
        if p.family == "sd3":
            out["text_encoder"], out["tokenizer"] = tiny_clip(base + 3, CLIPTextModelWithProjection, **CLIP)
            out["text_encoder_2"], out["tokenizer_2"] = tiny_clip(
                base + 4, CLIPTextModelWithProjection, **CLIP
            )
            out["text_encoder_3"], out["tokenizer_3"] = t5, t5_tok
        else:
            out["text_encoder"], out["tokenizer"] = tiny_clip(base + 3, CLIPTextModel, **CLIP)
            out["text_encoder_2"], out["tokenizer_2"] = t5, t5_tok
    return out


def save_tiny_dit_pipeline(preset: str | FlowTwinPreset, folder: str | Path, seed: int | None = None) -> Path:
    """Write a tiny DiT preset as a diffusers pipeline folder through ``StableDiffusion3Pipeline`` /
    ``FluxPipeline``, so the folder loads with ``from_pretrained`` like a real download."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    p = get_flow_twin_preset(preset)
    comps = build_tiny_dit_components(p, seed=seed)
    pipe = StableDiffusion3Pipeline(**comps) if p.family == "sd3" else FluxPipeline(**comps)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


class FlowTwin(RandomWeights):
    """Random parts for an SD 3.x / FLUX.1 twin, in the backbone's ``dtype`` as ``from_pretrained`` gives.

    With ``pretrained`` unset every part gets random weights; with it, a twin loads as the real backbone does.
    """

    presets: ClassVar[dict[str, FlowTwinPreset]] = TWIN_PRESETS
    preset: Any
    torch_dtype: Any

    def build_random_parts(self, parts: list[str]) -> dict[str, Any]:
        new = build_tiny_dit_components(self.preset, parts=parts)
        if self.torch_dtype is not None:
            new.update({k: v.to(self.torch_dtype) for k, v in new.items() if k in DTYPE_PARTS})
        return new


class SD3Twin(FlowTwin, SD3Backbone):
    """A random tiny twin of SD 3.5 (dual attention, three text encoders), for tests; see :class:`FlowTwin`.

    Args:
        preset: ``tiny-sd3``; ``kwargs``: the arguments of :class:`SD3Backbone`.
    """

    def __init__(self, preset: str = "tiny-sd3", **kwargs: Any) -> None:
        super().__init__(preset, **kwargs)


class FluxTwin(FlowTwin, FluxBackbone):
    """A random tiny twin of FLUX.1 [dev] (packed latents, guidance embedding), for tests; see :class:`FlowTwin`.

    Args:
        preset: ``tiny-flux``; ``kwargs``: the arguments of :class:`FluxBackbone`.
    """

    def __init__(self, preset: str = "tiny-flux", **kwargs: Any) -> None:
        super().__init__(preset, **kwargs)
