"""A checkpoint -> a ready :class:`~tadm.inference.codec.Codec`: the :class:`~tadm.model.TADMModel` it
holds (:meth:`~tadm.model.TADMModel.from_checkpoint`), moved, prepared and wrapped with tiling,
precision and the ids LR files carry."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tadm.inference.codec import Codec, Precision, tensor_hash
from tadm.inference.tiling import Tiling
from tadm.model.checkpoints import read_checkpoint
from tadm.model.tadm_model import TADMModel
from tadm.ops.color_fix import ColorFix, check_color_fix


def load_codec(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    tiling: Tiling | None = None,
    backbone_pretrained: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    color_fix: ColorFix = "none",
    weights: str | None = None,
    compile_unet: bool | None = None,
) -> Codec:
    """Load a checkpoint for inference.

    Args:
        ckpt: a Lightning checkpoint of any stage or an exported ``.safetensors`` (``tadm export``).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for UNet, Refiner and VAE decoder.
        tiling: tile sizes (default: TADM's, see :class:`tadm.inference.tiling.Tiling`).
        backbone_pretrained: load the frozen backbone from this folder / hub id instead of the one the
            checkpoint was trained with (same weights, another place). Recorded ids are not checked then.
        channels_last: NHWC memory format for the backbone's networks (faster convolutions on GPUs).
        compile: ``torch.compile`` the networks of the upscale but the VAE: diffusion model, rescaler's
            upscale, aligner, hybrid scheduler (:meth:`TADMModel.prepare_inference`; pays off for many tiles
            or images of one size: each new size compiles again).
        color_fix: colour correction of every reconstruction (``none``, ``wavelet``, ``adain``; see
            :mod:`tadm.ops.color_fix`).
        weights: ``ema`` or ``raw`` trained tensors (default: the EMA when the checkpoint has one; see
            :func:`tadm.model.checkpoints.read_checkpoint`).
        compile_unet: the former name of ``compile`` (deprecated; it compiled the UNet only).
    """
    if compile_unet is not None:
        warnings.warn(
            "load_codec(compile_unet=...) is deprecated: use compile=..., which also compiles the rescaler's "
            "upscale, the aligner and the hybrid scheduler",
            DeprecationWarning,
            stacklevel=2,
        )
        compile = compile or compile_unet
    check_color_fix(color_fix)  # before the (slow) loading
    source = str(ckpt)
    state, meta = read_checkpoint(ckpt, weights)
    model = TADMModel.from_state(state, meta, source, backbone_pretrained)
    model.to(torch.device(device)).eval()
    model.prepare_inference(channels_last=channels_last, compile=compile)
    model_id = str(meta.get("model_id") or tensor_hash(state))
    return Codec(model, tiling or Tiling(), precision, model_id=model_id, source=source, color_fix=color_fix)
