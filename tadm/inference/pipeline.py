"""The HR -> LR -> HR round trip shared by validation, ``tadm test`` and the codec, tiled or whole.

Every step can run on tiles (see :mod:`tadm.inference.tiling`): VAE encode/decode on pixel/latent tiles
blended with ramps (GroupNorm statistics shared by all tiles: :mod:`tadm.inference.groupnorm_sync`), the rescaler on stitched tiles of the LR grid, the one-step enhancer on latent
tiles blended with Gaussian weights, each tile with its own timestep. ``NO_TILING`` processes
whole images (what training-time validation does on crops). An optional colour correction
(:mod:`tadm.ops.color_fix`) runs once on the whole blended, cropped output, never per tile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tadm.contracts import DiffusionBackbone, Rescaler, quantize_8bit
from tadm.inference.device_memory import fits_whole
from tadm.inference.groupnorm_sync import blend_tiles_synced
from tadm.inference.tiling import NO_TILING, Tiling, blend_tiles, enhancer_tiles, stitch_tiles, timestep_map
from tadm.ops.color_fix import apply_color_fix, check_color_fix
from tadm.ops.images import bicubic_down, bicubic_resize, crop_to, lcm, pad_to_multiple

log = logging.getLogger(__name__)

#: latents smaller than this (images under 128 px) are padded for the enhancer and cropped back
MIN_ENHANCE_LATENT = 16

#: the one-step enhancer: (z_hat, true HR latent or None) -> (z0_hat, timestep (B,) or (B,1,h,w))
Enhance = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]
#: a context the enhancer and the VAE decoder run in (e.g. bf16 autocast); the rescaler never does
Precision = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass
class Upscaled:
    """A reconstruction cropped to the requested size, and the timestep map the enhancer used
    (latent resolution; None without an enhancer)."""

    image: Tensor
    timesteps: Tensor | None


@dataclass
class RoundTrip:
    """LR image (of the padded HR image), the reconstruction cropped to the input size, timesteps."""

    lr: Tensor
    reconstruction: Tensor
    padded_size: tuple[int, int]
    timesteps: Tensor | None = None


def pad_multiple(backbone: DiffusionBackbone, rescaler: Rescaler) -> int:
    """HR sizes must be multiples of both the scale and the latent downsampling."""
    return lcm(rescaler.scale, backbone.downsample_factor)


def encode(backbone: DiffusionBackbone, x: Tensor, tiling: Tiling = NO_TILING) -> Tensor:
    """VAE encode, on ``tiling.vae_tile`` pixel tiles blended over the overlap when the image is larger
    (GroupNorm statistics per ``tiling.vae_norm``)."""
    f = backbone.downsample_factor
    tile, overlap = _vae_geometry(tiling, f)
    return _blend_vae(backbone.encode, x, tiling, tile=tile, overlap=overlap, scale=1 / f, align=f)


def decode(backbone: DiffusionBackbone, z: Tensor, tiling: Tiling = NO_TILING) -> Tensor:
    """VAE decode, on latent tiles of ``tiling.vae_tile`` pixels blended over the overlap (GroupNorm
    statistics per ``tiling.vae_norm``), or whole where ``tiling.vae_whole`` finds room on the GPU."""
    f = backbone.downsample_factor
    tile, overlap = _vae_geometry(tiling, f)
    if tiling.vae_whole and 0 < tile < max(z.shape[-2:]) * f and fits_whole(z, f):
        whole = _decode_whole(backbone, z)
        if whole is not None:
            return whole
    return _blend_vae(backbone.decode, z, tiling, tile=tile // f, overlap=overlap // f, scale=f, align=1)


def _decode_whole(backbone: DiffusionBackbone, z: Tensor) -> Tensor | None:
    """``backbone.decode(z)``, or None when the device runs out of memory after all (then tiles)."""
    try:
        return backbone.decode(z)
    except torch.OutOfMemoryError:
        pass  # leave the handler first: its traceback holds the failed call's tensors
    if z.device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning(
        "the %dx%d latent (batch %d) did not fit the free GPU memory after all: decoding it in tiles",
        z.shape[-1],
        z.shape[-2],
        z.shape[0],
    )
    return None


def _blend_vae(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tiling: Tiling,
    *,
    tile: int,
    overlap: int,
    scale: float,
    align: int,
) -> Tensor:
    """Ramp-blended VAE tiles, their GroupNorms synchronised over all tiles unless ``per_tile``."""
    if tiling.vae_norm == "synced":
        return blend_tiles_synced(
            fn, x, tile=tile, overlap=overlap, scale=scale, align=align, passes=tiling.vae_norm_passes
        )
    return blend_tiles(fn, x, tile=tile, overlap=overlap, scale=scale, weight="ramp", align=align)[0]


def _vae_geometry(tiling: Tiling, f: int) -> tuple[int, int]:
    if tiling.vae_tile <= 0:
        return 0, 0
    tile = max(f, tiling.vae_tile // f * f)
    return tile, min(tiling.vae_overlap // f * f, tile - f)


def _rescaler_factor(backbone: DiffusionBackbone, rescaler: Rescaler) -> int | None:
    """Latent pixels per LR pixel, or None when that is not a whole number (no rescaler tiling)."""
    f = backbone.downsample_factor
    return rescaler.scale // f if rescaler.scale % f == 0 else None


def downscale(
    backbone: DiffusionBackbone, rescaler: Rescaler, x: Tensor, tiling: Tiling = NO_TILING
) -> tuple[Tensor, tuple[int, int], Tensor | None]:
    """HR image of any size -> (LR image of the reflect-padded HR image, original (H, W), HR latent).

    The latent is None for pixel-space rescalers.
    """
    xp, size = pad_to_multiple(x, pad_multiple(backbone, rescaler))
    z = encode(backbone, xp, tiling) if rescaler.space == "latent" else None
    s = rescaler.scale
    grid = (xp.shape[-2] // s, xp.shape[-1] // s)
    zf = _rescaler_factor(backbone, rescaler)
    if zf is None and z is not None:
        return rescaler.downscale(xp, z), size, z
    y = stitch_tiles(
        rescaler.downscale, [xp, z], [s, zf or 1], grid, 1, tile=tiling.lr_tile, overlap=tiling.lr_overlap
    )
    return y, size, z


def rescale_up(
    backbone: DiffusionBackbone, rescaler: Rescaler, y: Tensor, tiling: Tiling = NO_TILING
) -> Tensor:
    """LR image -> z_hat (latent rescalers) or the uncropped HR image (pixel rescalers), in tiles."""
    grid = (y.shape[-2], y.shape[-1])
    noise = rescaler.upscale_noise(y)  # drawn once for the whole image: tiled == whole
    inputs = [y] if noise is None else [y, noise]
    factor = rescaler.scale
    if rescaler.space == "latent":
        zf = _rescaler_factor(backbone, rescaler)
        if zf is None:
            return rescaler.upscale(*inputs)
        factor = zf
    return stitch_tiles(
        rescaler.upscale,
        inputs,
        [1] * len(inputs),
        grid,
        factor,
        tile=tiling.lr_tile,
        overlap=tiling.lr_overlap,
    )


def enhance_and_decode(
    backbone: DiffusionBackbone,
    rescaler: Rescaler,
    out: Tensor,
    size: tuple[int, int],
    enhance: Enhance | None = None,
    tiling: Tiling = NO_TILING,
    z_true: Tensor | None = None,
) -> Upscaled:
    """What :func:`rescale_up` gave -> the HR image cropped to ``size``.

    ``enhance`` (stages 2/3) maps z_hat to z0_hat on latent tiles blended with Gaussian weights,
    each tile with its own timestep; ``z_true`` (the HR latent) is only for analysis aligners. A pixel
    rescaler's image is the output, or with ``enhance`` first encoded by the VAE (pixel rescaling + SD prior).
    """
    if rescaler.space != "latent":
        if enhance is None:
            return Upscaled(crop_to(out.clamp(-1.0, 1.0), size), None)
        out = encode(backbone, out.clamp(-1.0, 1.0), tiling)
    timesteps = None
    if enhance is not None:
        lh, lw = out.shape[-2:]
        pad = MIN_ENHANCE_LATENT if min(lh, lw) < MIN_ENHANCE_LATENT else backbone.latent_multiple
        if lh % pad or lw % pad:  # tiny images: the UNet needs room; a DiT takes whole patches
            out, _ = pad_to_multiple(out, pad)
            z_true = None if z_true is None else pad_to_multiple(z_true, pad)[0]
        tile, overlap = enhancer_tiles(tiling, backbone.latent_multiple)

        def one(z_tile: Tensor, true_tile: Tensor | None) -> tuple[Tensor, Tensor]:
            z0, t = enhance(z_tile, true_tile)
            return z0, timestep_map(t, (z_tile.shape[-2], z_tile.shape[-1]))

        out, timesteps = blend_tiles(
            one,
            out,
            tile=tile,
            overlap=overlap,
            weight="gaussian",
            var=tiling.gaussian_var,
            align=backbone.latent_multiple,
            batch=tiling.tile_batch,
            extras=[z_true],
        )
        out, timesteps = crop_to(out, (lh, lw)), crop_to(timesteps, (lh, lw))
    return Upscaled(crop_to(decode(backbone, out, tiling), size), timesteps)


def upscale(
    backbone: DiffusionBackbone,
    rescaler: Rescaler,
    y: Tensor,
    size: tuple[int, int],
    enhance: Enhance | None = None,
    tiling: Tiling = NO_TILING,
    z_true: Tensor | None = None,
    precision: Precision = contextlib.nullcontext,
    color_fix: str = "none",
) -> Upscaled:
    """LR image -> HR image in [-1, 1] cropped to ``size``: :func:`rescale_up` in fp32, then
    :func:`enhance_and_decode` inside ``precision()`` (e.g. a bf16 autocast), then ``color_fix``
    (``none``, ``wavelet``, ``adain``) in fp32 on the whole image against :func:`color_reference`."""
    check_color_fix(color_fix)
    out = rescale_up(backbone, rescaler, y.float(), tiling)
    with precision():
        up = enhance_and_decode(backbone, rescaler, out, size, enhance, tiling, z_true)
    if color_fix == "none":
        return up
    image = apply_color_fix(up.image, color_reference(y, rescaler.scale, size), color_fix)
    return Upscaled(image, up.timesteps)


def color_reference(y: Tensor, scale: int, size: tuple[int, int]) -> Tensor:
    """What colour correction matches: the LR image's antialiased bicubic upscale to the padded HR size
    (``scale`` times its size), cropped to ``size`` like the reconstruction, in fp32."""
    up = bicubic_resize(y.float(), (y.shape[-2] * scale, y.shape[-1] * scale))
    return crop_to(up, size)


@torch.no_grad()
def round_trip(
    backbone: DiffusionBackbone,
    rescaler: Rescaler,
    x: Tensor,
    enhance: Enhance | None = None,
    tiling: Tiling = NO_TILING,
    precision: Precision = contextlib.nullcontext,
    color_fix: str = "none",
) -> RoundTrip:
    """Downscale then upscale ``x`` (the rescaler in fp32, the rest in ``precision()``, then
    ``color_fix``); analysis aligners get the HR latent the downscale computed."""
    y, size, z = downscale(backbone, rescaler, x.float(), tiling)
    up = upscale(
        backbone, rescaler, y, size, enhance, tiling, z_true=z, precision=precision, color_fix=color_fix
    )
    s = rescaler.scale
    return RoundTrip(y, up.image, (y.shape[-2] * s, y.shape[-1] * s), up.timesteps)


@torch.no_grad()
def bicubic_round_trip(x: Tensor, scale: int) -> Tensor:
    """Bicubic down to an 8-bit LR image, bicubic up, cropped back: the baseline every report shows.

    The same arithmetic as the ``bicubic`` rescaler, without a backbone (HR padded to a multiple of
    ``scale`` only).
    """
    xp, size = pad_to_multiple(x.float(), scale)
    y = quantize_8bit(bicubic_down(xp, scale), training=False)
    return crop_to(bicubic_resize(y, (xp.shape[-2], xp.shape[-1])), size)
