"""Tiled processing of images of any size with bounded memory (docs/method.md, "Inference on large images").

Three kinds of tiling, each where it serves:

- :func:`blend_tiles` -- overlapping tiles whose outputs are blended with smooth weights. The one-step
  enhancer runs on latent tiles (default 96, overlap 32) blended with TADM's Gaussian weights
  (sigma^2 = 0.01 on tile-normalised coordinates); each tile gets its OWN timestep, so a scalar
  aligner yields a piecewise map that the blending makes continuous. The VAE encoder and decoder run
  on pixel / latent tiles blended with linear ramps over the overlap; by default their GroupNorm
  layers use statistics of the whole image gathered over all tiles first (``Tiling.vae_norm``,
  :mod:`tadm.inference.groupnorm_sync`), as TADM's release does with multidiffusion's VAEHook.
- :func:`stitch_tiles` -- overlapping tiles cut at the middle of each overlap, no blending: for the
  rescaler, whose quantised 8-bit LR image must stay exactly 8-bit.

Unlike diffusers' own ``AutoencoderKL`` tiling, every tile here has the full tile size (the last
row / column is aligned to the image edge instead of being a thin strip whose GroupNorm statistics
shift its colours), and outputs are accumulated into one preallocated tensor instead of a list of all
decoded tiles (which costs about twice the output's memory at 8K).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Weight = Literal["gaussian", "ramp"]
VaeNorm = Literal["synced", "per_tile"]


@dataclass
class Tiling:
    """How inference splits large inputs; defaults from TADM's release. Sizes <= 0 disable that tiling.

    Args:
        latent_tile: enhancer tile size in latent pixels (96 = 768 image pixels).
        latent_overlap: overlap of neighbouring enhancer tiles in latent pixels.
        tile_batch: enhancer tiles per UNet call (raise it on a GPU).
        gaussian_var: variance of the Gaussian blending weights on tile-normalised coordinates.
        vae_tile: VAE decoder / encoder tile in image pixels (a multiple of the VAE downsampling).
        vae_overlap: overlap of VAE tiles in image pixels.
        vae_norm: GroupNorm statistics of VAE tiles: ``synced`` (image-wide, gathered over all tiles
            in ``vae_norm_passes`` extra passes; TADM's release) or ``per_tile`` (each tile its own:
            faster, but small tiles shift colours).
        vae_norm_passes: statistics passes over the tiles before the output pass in ``synced`` mode;
            pass k makes the first k GroupNorm layers' statistics exact (see groupnorm_sync).
        vae_whole: on a CUDA device, decode a latent larger than a VAE tile whole when the free memory
            allows (:mod:`tadm.inference.device_memory`): the exact result, one decoder call, no statistics
            pass; tiles again if the device runs out of memory. Never on a CPU. False: always tiles.
        lr_tile: rescaler tile in LR pixels (128 LR pixels = 2048 HR pixels at x16).
        lr_overlap: context on each side of a rescaler tile, in LR pixels, discarded when stitching.
    """

    latent_tile: int = 96
    latent_overlap: int = 32
    tile_batch: int = 1
    gaussian_var: float = 0.01
    vae_tile: int = 768
    vae_overlap: int = 128
    vae_norm: VaeNorm = "synced"
    vae_norm_passes: int = 1
    vae_whole: bool = True
    lr_tile: int = 128
    lr_overlap: int = 16

    def __post_init__(self) -> None:
        for name, tile, overlap in (
            ("latent", self.latent_tile, self.latent_overlap),
            ("vae", self.vae_tile, self.vae_overlap),
            ("lr", self.lr_tile, self.lr_overlap),
        ):
            if tile > 0 and not 0 <= overlap < tile:
                raise ValueError(f"{name}_overlap must be in [0, {name}_tile={tile}), got {overlap}")
        if self.lr_tile > 0 and 2 * self.lr_overlap >= self.lr_tile:
            raise ValueError(_stitch_overlap_error("lr_tile", self.lr_tile, "lr_overlap", self.lr_overlap))
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {self.tile_batch}")
        if self.vae_norm not in ("synced", "per_tile"):
            raise ValueError(f"vae_norm must be 'synced' or 'per_tile', got {self.vae_norm!r}")
        if self.vae_norm_passes < 1:
            raise ValueError(f"vae_norm_passes must be >= 1, got {self.vae_norm_passes}")
        if self.gaussian_var <= 0:
            raise ValueError(f"gaussian_var must be > 0, got {self.gaussian_var}")


NO_TILING = Tiling(latent_tile=0, vae_tile=0, lr_tile=0)


def enhancer_tiles(tiling: Tiling, multiple: int = 1) -> tuple[int, int]:
    """The enhancer's latent tile and overlap for a diffusion model that takes multiples of ``multiple``
    (a DiT's patch size, ``DiffusionBackbone.latent_multiple``): the tile rounded down to one, so that with
    starts aligned to it every tile's patch grid is the whole image's (FLUX.1 tiny twin, 16-latent tiles:
    37 dB tiled vs whole aligned, 20 dB at odd offsets)."""
    if tiling.latent_tile <= 0 or multiple <= 1:
        return tiling.latent_tile, tiling.latent_overlap
    tile = max(multiple, tiling.latent_tile // multiple * multiple)
    return tile, min(tiling.latent_overlap, tile - multiple)


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size``; the last one ends at the edge.

    Starts are multiples of ``align`` (the last one too when ``size`` and ``tile`` are), and
    neighbours overlap by at least ``overlap``.
    """
    if tile >= size:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile + 1, stride))
    last = (size - tile) // align * align
    if starts[-1] != last:
        starts.append(last)
    return starts


def _axis_weight(n: int, kind: Weight, overlap: int, var: float, device: torch.device) -> Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)
    if kind == "gaussian":
        mid = (n - 1) / 2
        return torch.exp(-(((pos - mid) / n) ** 2) / (2 * var))
    if overlap <= 0:
        return torch.ones(n, device=device)
    ramp = torch.minimum((pos + 0.5) / overlap, (n - 0.5 - pos) / overlap)
    return ramp.clamp(1e-3, 1.0)


def tile_weight(
    h: int,
    w: int,
    kind: Weight = "gaussian",
    overlap: int = 0,
    var: float = 0.01,
    device: torch.device | None = None,
) -> Tensor:
    """(h, w) blending weights: TADM's Gaussian, or linear ramps over ``overlap`` at every edge.

    Only ratios matter (the blend divides by the summed weights), so where a single tile covers a
    pixel its weight cancels out, even at the image border.
    """
    dev = device or torch.device("cpu")
    return (
        _axis_weight(h, kind, overlap, var, dev)[:, None] * _axis_weight(w, kind, overlap, var, dev)[None, :]
    )


TileFn = Callable[..., Tensor | tuple[Tensor, ...]]


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def blend_tiles(
    fn: TileFn,
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    weight: Weight = "gaussian",
    var: float = 0.01,
    align: int = 1,
    batch: int = 1,
    extras: Sequence[Tensor | None] = (),
) -> tuple[Tensor, ...]:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` crops of ``x`` and blend the outputs.

    ``fn(x_tile, *extra_tiles)`` returns one tensor or a tuple, each (B, C, th*scale, tw*scale).
    ``extras`` are tensors of ``x``'s spatial size cropped alongside (None passes through), e.g.
    the true latent an oracle aligner needs. Up to ``batch`` tiles go through ``fn`` together.
    Outputs are accumulated in float32 into preallocated tensors; returns a tuple of outputs.
    An input no larger than one tile is passed to ``fn`` whole.
    """
    b, _, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return tuple(o.float() for o in _as_tuple(fn(x, *extras)))
    th, tw = min(tile, h), min(tile, w)
    ys = tile_starts(h, th, overlap, align)
    xs = tile_starts(w, tw, overlap, align)
    coords = [(y, x0) for y in ys for x0 in xs]
    oh, ow = _scaled(th, scale), _scaled(tw, scale)
    wgt = tile_weight(oh, ow, weight, _scaled(overlap, scale), var, x.device)
    acc: list[Tensor] = []
    wsum = torch.zeros(1, 1, _scaled(h, scale), _scaled(w, scale), device=x.device)
    for i in range(0, len(coords), batch):
        chunk = coords[i : i + batch]
        crops = torch.cat([x[..., y : y + th, x0 : x0 + tw] for y, x0 in chunk])
        extra_crops = [
            None if e is None else torch.cat([e[..., y : y + th, x0 : x0 + tw] for y, x0 in chunk])
            for e in extras
        ]
        outs = _as_tuple(fn(crops, *extra_crops))
        if not acc:
            acc = [torch.zeros(b, o.shape[1], *wsum.shape[-2:], device=x.device) for o in outs]
        for k, (y, x0) in enumerate(chunk):
            oy, ox = _scaled(y, scale), _scaled(x0, scale)
            for a, o in zip(acc, outs, strict=True):
                a[..., oy : oy + oh, ox : ox + ow] += o[k * b : (k + 1) * b].float() * wgt
            wsum[..., oy : oy + oh, ox : ox + ow] += wgt
    return tuple(a.div_(wsum) for a in acc)


def stitch_tiles(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor | None],
    factors: Sequence[int],
    grid: tuple[int, int],
    out_factor: int,
    *,
    tile: int,
    overlap: int,
) -> Tensor:
    """Run ``fn`` on overlapping tiles of a common grid and keep each tile's central part.

    Sizes are in grid units: ``inputs[i]`` has ``factors[i]`` pixels per grid pixel, the output
    ``out_factor``. Each tile carries ``overlap`` grid pixels of context on each inner side; the
    output is cut at the middle of each overlap, so every output pixel comes from exactly one tile
    (no blending: quantised outputs stay quantised). Used for the rescaler at any image size.
    """
    gh, gw = grid
    if tile <= 0 or (gh <= tile and gw <= tile):
        return fn(*inputs)
    if 2 * overlap >= tile:
        raise ValueError(_stitch_overlap_error("tile", tile, "overlap", overlap))
    th, tw = min(tile, gh), min(tile, gw)
    ys, xs = tile_starts(gh, th, 2 * overlap), tile_starts(gw, tw, 2 * overlap)
    ycuts, xcuts = tile_cuts(ys, th, gh), tile_cuts(xs, tw, gw)
    out: Tensor | None = None
    for iy, y in enumerate(ys):
        for ix, x0 in enumerate(xs):
            crops = [
                None if t is None else t[..., y * f : (y + th) * f, x0 * f : (x0 + tw) * f]
                for t, f in zip(inputs, factors, strict=True)
            ]
            o = fn(*crops)
            if out is None:
                out = o.new_zeros(o.shape[0], o.shape[1], gh * out_factor, gw * out_factor)
            (y0, y1), (x1_, x2_) = ycuts[iy], xcuts[ix]
            f = out_factor
            out[..., y0 * f : y1 * f, x1_ * f : x2_ * f] = o[
                ..., (y0 - y) * f : (y1 - y) * f, (x1_ - x0) * f : (x2_ - x0) * f
            ]
    assert out is not None
    return out


def max_stitch_overlap(tile: int) -> int:
    """The most context a stitched tile can carry on each side: below half the tile (see ``stitch_tiles``)."""
    return max(0, (tile - 1) // 2)


def _stitch_overlap_error(tile_name: str, tile: int, overlap_name: str, overlap: int) -> str:
    """A stitched tile carries its overlap of context on both sides: with 2 x overlap >= tile nothing is left
    to advance by, and the tiles would step one pixel at a time (a 64x48 LR image at tile 32, overlap 16:
    561 tiles, 70x the time of one)."""
    return (
        f"{overlap_name} must be below half of {tile_name}: each tile carries {overlap_name} of context on both "
        f"sides, so {tile_name}={tile} allows at most {max_stitch_overlap(tile)}, got {overlap}"
    )


def tile_cuts(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """The part of each tile kept (stitching) or owned (GroupNorm statistics): from the middle of the
    overlap with the previous tile to the middle of the overlap with the next; the parts partition
    ``[0, size)``."""
    bounds = [0] + [(starts[i] + starts[i - 1] + tile) // 2 for i in range(1, len(starts))] + [size]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def _scaled(n: int, scale: float) -> int:
    v = n * scale
    if abs(v - round(v)) > 1e-9:
        raise ValueError(f"tile geometry {n} x {scale} is not a whole number of output pixels")
    return int(round(v))


def timestep_map(t: Tensor, size: tuple[int, int]) -> Tensor:
    """A (B,) timestep or a (B,1,h,w) map as a float (B,1,H,W) map at ``size`` (for blending and logging)."""
    if t.ndim == 1:
        return t.float()[:, None, None, None].expand(-1, 1, *size)
    if t.ndim == 4 and t.shape[1] == 1:
        if tuple(t.shape[-2:]) != tuple(size):
            t = torch.nn.functional.interpolate(t.float(), size=size, mode="bilinear", align_corners=False)
        return t.float()
    raise ValueError(f"a timestep must be (B,) or a (B,1,h,w) map, got shape {tuple(t.shape)}")


__all__ = [
    "NO_TILING",
    "Tiling",
    "blend_tiles",
    "enhancer_tiles",
    "stitch_tiles",
    "tile_cuts",
    "tile_starts",
    "tile_weight",
    "timestep_map",
]
