"""Shared checks of the rectified-flow DiT backbones (SD 3.x, FLUX.1) on their tiny twins.

``tests/components/test_backbone_sd3.py`` and ``tests/components/test_backbone_flux.py`` run the same contract checks on their
family through these functions (no test module imports another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.components.aligners.tpm import TimestepPredictionModule
from tadm.components.rescalers.dfrm import DFRM
from tadm.testing.twins.flow_twins import FluxTwin, SD3Twin
from tadm.training.lightning_module import TADMModule
from tests.helpers import CONFIGS, SAMPLES

TINY = {"sd3": "tiny-sd3", "flux": "tiny-flux"}
TWINS = {"sd3": SD3Twin, "flux": FluxTwin}
BACKBONE_YAML = {
    "sd3": CONFIGS / "backbone" / "sd35-medium.yaml",
    "flux": CONFIGS / "backbone" / "flux1-dev.yaml",
}
#: weights of each stage without the VGG-based perceptual terms
LOSSES = {
    "rescaler": {"lr": 3.0, "latent_forward": 1.0, "latent_backward": 1.0},
    "enhancer": {"pixel": 1.0},
    "joint": {"lr": 3.0, "latent_forward": 1.0, "latent_backward": 1.0, "pixel": 1.0},
}


def tiny_backbone(family: str, **kwargs: Any) -> Any:
    return TWINS[family](TINY[family], **kwargs)


def tiny_module(family: str, stage: str, scale: int = 16, **backbone_kwargs: Any) -> TADMModule:
    """The family's tiny twin under a slim DFRM, the TPM and the default Refiner, as YAML would build them
    (aligner and Refiner follow the backbone's 16 channels)."""
    torch.manual_seed(0)
    module = TADMModule(
        backbone=tiny_backbone(family, **backbone_kwargs),
        rescaler=DFRM(scale=scale, latent_channels=16, width=16, num_resblocks=1, num_couplings=2),
        stage=stage,  # type: ignore[arg-type]
        scale=scale,
        aligner=TimestepPredictionModule() if stage != "rescaler" else None,
        loss_weights=LOSSES[stage],
    )
    module.configure_model()  # what a trainer does first: the twin's parts load here
    return module


def photo(size: tuple[int, int] = (200, 296)) -> Tensor:
    """The bundled astronaut, area-resized (not a multiple of 16: the pipeline pads)."""
    from tadm.datamodules.image_io import load_image

    return F.interpolate(load_image(SAMPLES / "train" / "astronaut.png")[None], size=size, mode="area")


def one_step(m: TADMModule, x: Tensor) -> dict[str, set[str]]:
    """One optimiser step of ``m``'s stage on ``x``: the trainable names, those with a non-zero gradient, and
    the parameter names a checkpoint stores."""
    params = m.trainable_parameters()
    ids = {id(p) for p in params}
    trainable = {n for n, p in m.model.named_parameters() if id(p) in ids}  # named as checkpoints store them
    opt = torch.optim.AdamW(params, lr=1e-3)
    m.train()
    loss = m.training_step({"image": x}, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in m.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    checkpoint: dict[str, Any] = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    named = dict(m.model.named_parameters())
    stored = {k for k in checkpoint["state_dict"] if k in named}
    return {"trainable": trainable, "grads": grads, "stored": stored, "meta": checkpoint["tadm"]}


def check_trained_set(family: str, stage: str, scale: int = 16) -> dict[str, set[str]]:
    """A step in ``stage``: the trained parameters are exactly LoRA (transformer + VAE decoder), the TPM and
    the Refiner (+ the DFRM in joint; the DFRM alone in stage 1), all get gradients, and a checkpoint holds
    them (plus the frozen DFRM of stage 2) and nothing of the frozen backbone."""
    m = tiny_module(family, stage, scale=scale)
    done = one_step(m, photo((64, 64)) if stage == "rescaler" else photo((64, 5 * scale)))
    trainable = done["trainable"]
    parts = {n.split(".")[0] for n in trainable}
    want = {"rescaler": {"rescaler"}, "enhancer": {"backbone", "aligner", "enhancer"}}.get(
        stage, {"backbone", "aligner", "enhancer", "rescaler"}
    )
    assert parts == want, parts
    backbone = {n for n in trainable if n.startswith("backbone.")}
    assert all(".lora_A." in n or ".lora_B." in n for n in backbone), sorted(backbone)[:5]
    assert {n.split(".")[1] for n in backbone} == ({"transformer", "vae"} if stage != "rescaler" else set())
    assert all(".decoder." in n for n in backbone if n.startswith("backbone.vae."))
    assert all(n.startswith("enhancer.refiner.") for n in trainable if n.startswith("enhancer."))
    if stage != "rescaler":
        lora_a = {n for n in backbone if ".lora_A." in n}
        assert {
            n.replace(".lora_A.", ".lora_B.") for n in lora_a
        } == backbone - lora_a  # A and B of each layer
        # the first step reaches every LoRA B (A gets none while B is zero), the Refiner's zero-initialised tail
        # and the TPM, which learns through the transformer's time embedding
        reached = {
            n for n in trainable if ".lora_B." in n or n.startswith(("aligner.", "enhancer.refiner.tail."))
        }
        assert reached <= done["grads"], sorted(reached - done["grads"])[:5]
    stored = done["stored"]
    assert trainable <= stored and all(k.startswith("rescaler.") for k in stored - trainable)
    assert done["meta"]["backbone_id"] == m.backbone.backbone_id
    return done


def save_pipeline(family: str, folder: Path) -> Path:
    from tadm.testing.twins.flow_twins import save_tiny_dit_pipeline

    return save_tiny_dit_pipeline(TINY[family], folder)


@torch.no_grad()
def pipeline_one_step(family: str, z: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """diffusers' own pipeline on the tiny twin's weights: one Euler step of the empty prompt from ``sigma``
    (shifted by the pipeline's scheduler) to 0 on the scaled latent ``z``; returns (x0, the timestep it used).
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from tadm.testing.twins.flow_twins import build_tiny_dit_components

    comps = build_tiny_dit_components(TINY[family])  # the same per-module seeds as the backbone's weights
    for module in comps.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # T5's dropout: built modules start in training mode
    b, c, h, w = z.shape
    common: dict[str, Any] = dict(
        prompt="",
        height=h * 8,
        width=w * 8,
        num_inference_steps=1,
        sigmas=[sigma],
        output_type="latent",
        max_sequence_length=8,
    )
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**comps)
        out = pipe(latents=z, guidance_scale=1.0, **common).images  # guidance 1: no classifier-free guidance
    else:
        pipe = FluxPipeline(**comps)
        packed = FluxPipeline._pack_latents(z, b, c, h, w)
        out = pipe(latents=packed, guidance_scale=3.5, **common).images
        out = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
    return out, pipe.scheduler.timesteps[:1].expand(b)


def check_round_trips(family: str, min_agreement_db: float) -> None:
    """The codec path on the tiny twin: whole image, and latent tiles of 16 and 15 (rounded down to the patch
    size and aligned to it) blended: the enhancer's tiled result agrees with the whole image's within
    ``min_agreement_db`` (random global attention makes them differ at all); with VAE and rescaler tiles too,
    shapes, range and per-tile timesteps in the aligner's mapped range."""
    from tadm.evaluation.metrics import psnr_y
    from tadm.inference import pipeline
    from tadm.inference.tiling import NO_TILING, Tiling

    m = tiny_module(family, "enhancer").eval()
    x = photo()
    whole = pipeline.round_trip(m.backbone, m.rescaler, x, m.model.enhance_fn, NO_TILING)
    assert whole.reconstruction.shape == x.shape and torch.isfinite(whole.reconstruction).all()
    lo, hi = m.aligner.t_min, m.aligner.t_max
    assert (lo, hi) == pytest.approx((89.5, 363.7), abs=0.1)  # TADM's [10, 200] at the same noise level
    for tile in (16, 15):
        enhancer_only = Tiling(latent_tile=tile, latent_overlap=6, vae_tile=0, lr_tile=0)
        tiled = pipeline.round_trip(m.backbone, m.rescaler, x, m.model.enhance_fn, enhancer_only)
        assert torch.equal(tiled.lr, whole.lr)
        agreement = psnr_y(tiled.reconstruction, whole.reconstruction).item()
        assert agreement >= min_agreement_db, (tile, agreement)
        everything = Tiling(
            latent_tile=tile, latent_overlap=6, vae_tile=128, vae_overlap=32, lr_tile=8, lr_overlap=2
        )
        tiled = pipeline.round_trip(m.backbone, m.rescaler, x, m.model.enhance_fn, everything)
        assert tiled.reconstruction.shape == x.shape and tiled.reconstruction.abs().max() <= 1
        assert tiled.timesteps is not None and tiled.timesteps.shape == (1, 1, 26, 38)
        assert ((tiled.timesteps >= lo - 1e-3) & (tiled.timesteps <= hi + 1e-3)).all()
