"""VAE tiles that share GroupNorm statistics computed over ALL tiles (the default ``Tiling.vae_norm``).

A VAE normalises its activations with GroupNorm over the whole input it is given. Run on tiles, every
tile uses its own statistics, and on small or uneven tiles (sky next to foliage) those shift each
tile's colours and contrast: the blending hides the seams, not the blotches. TADM's release tiles
the VAE with multidiffusion's ``VAEHook``, which runs the network layer by layer over all tiles and
gives every GroupNorm statistics pooled over the tiles. This module does the same through any
callable, without forking the VAE and without holding every tile's activations at once.

**How.** :func:`blend_tiles_synced` runs the tiled function (``backbone.encode`` / ``backbone.decode``:
the backbone contract exposes no modules, so nothing is hooked on them) under :class:`GroupNormSync`,
a :class:`torch.overrides.TorchFunctionMode` that intercepts every ``torch.nn.functional.group_norm``
(what ``nn.GroupNorm.forward`` calls) and ``torch.group_norm`` made in the current thread while it is
active. A GroupNorm call is identified by its rank among the calls of one run of the function, the
same on every tile (checked). ``passes`` statistics passes over all tiles precede the output pass:

- a statistics pass runs every tile and merges, per GroupNorm call, each sample's per-group count,
  mean and sum of squared deviations (Chan's parallel formulas, float32) over the part of the tile
  it *owns*: tiles cut at the middle of their overlaps partition the image, so every pixel counts
  once, at each layer's own resolution (an attention block's (B, C, h*w) norm input is unflattened
  with the tile's aspect). Its outputs are discarded.
- pass ``p`` normalises calls ``1 .. p-1`` with the statistics the earlier passes made exact and
  the later calls with each tile's own; call ``p``'s pooled statistics are then exact, and the last
  pass's pooled statistics of the later calls are kept as estimates. A pass that only needs call
  ``p`` abandons each tile right after it (:class:`TileDone`).
- the output pass normalises every call with the pooled statistics, and the outputs are blended as
  in per-tile mode (:func:`tadm.inference.tiling.blend_tiles`, ramp weights).

**What is exact, what is approximate.** A GroupNorm's input depends on how every earlier one
normalised, so exactness needs one barrier per layer. With ``passes`` >= the number of GroupNorm
calls (tiny SD VAE: 14 in the encoder, 22 in the decoder; SD's VAE: 22 / 30; any larger value stops
when all are exact) every call gets exactly the whole image's statistics *of the activations the
tiles compute*, which are the whole-image pass's own when each tile's owned part lies farther than
the receptive field from its inner edges (``tests/inference/test_tiling.py`` checks equality on a local
GroupNorm network). What then still differs from the whole-image pass is the rest of what is not
local: mid-block self-attention sees only its tile, deep convolutions see beyond the overlap. The
default, ONE pass, is exact for the first call only: the later ones are pooled from activations that
were normalised per tile upstream. A trained VAE tolerates that well; a random-weight decoder need not
(there one pass can be worse than per-tile statistics; exact ones are not). Measured on the tiny SD
VAE trained on photos (``benchmarks/vae_tiling.py``, README there), tiled round trip vs whole image:
one pass 10-12 dB closer than per-tile statistics, exact statistics 10-14 dB, and not always better
than one pass (the attention and receptive-field differences that remain interact with them); on
one image it was much less (a downscaled ``astronaut.png``, 64-px tiles: +1 dB, exact +7 dB). More
passes do not improve the estimates monotonically; only reaching every call makes them exact. (VAEHook
pools the tiles' variances without the spread of their means and counts its tile padding: its
statistics are pooled, not exactly the whole image's either.)

**Cost and memory.** One pass runs the tiles twice (collect, then output): 2.4-3.7x the per-tile
time on the tiny VAE, where the mode's Python call per torch function weighs more than on SD's VAE
(about 2x expected there, not measured). Exact statistics cost the sum over calls of the forward up
to each: 9-18x on the tiny VAE (decoder calls are cheap early, encoder calls late). Memory stays that
of one tile: between tiles and passes only three (B, groups) float32 tensors per GroupNorm call are
kept (a few KB for SD's VAE), never activations. VAEHook's layer-by-layer run is one pass but holds
every tile's current activation and residual, i.e. the whole image's (about 100 GB of RAM at 8K by
its own account).

**Limits.** Only ``group_norm`` calls that reach PyTorch's dispatcher are seen: a ``torch.compile``-d
VAE (tadm compiles only the UNet) or a hand-written normalisation is not synchronised. A function
with no GroupNorm pays one wasted pass. Inference only: statistics are collected without gradients
through other tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from tadm.inference.tiling import blend_tiles, tile_cuts, tile_starts

_GROUP_NORMS = (F.group_norm, torch.group_norm)
#: (y0, y1, x0, x1): the part of a tile it owns, in the tile's own input pixels
Region = tuple[int, int, int, int]


@dataclass
class GroupStats:
    """Image-wide statistics of one GroupNorm call: per (sample, group) mean and biased variance."""

    groups: int
    channels: int
    mean: Tensor
    var: Tensor


class _Accumulator:
    """Per GroupNorm call: count, mean and sum of squared deviations, merged tile by tile (Chan et al.)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float, Tensor, Tensor]] = []  # groups, channels, n, mean, m2

    def add(self, k: int, groups: int, channels: int, xs: Tensor) -> None:
        n_b = float(xs.shape[-1])
        if n_b == 0:
            return
        mean_b = xs.mean(dim=-1)
        m2_b = (xs - mean_b[..., None]).square().sum(dim=-1)
        if k == len(self.calls):
            self.calls.append((groups, channels, n_b, mean_b, m2_b))
            return
        g, c, n_a, mean_a, m2_a = self.calls[k]
        _check_same(k, (g, c, mean_a.shape[0]), (groups, channels, mean_b.shape[0]))
        n = n_a + n_b
        delta = mean_b - mean_a
        self.calls[k] = (g, c, n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n))

    def finish(self) -> list[GroupStats]:
        return [GroupStats(g, c, mean, m2 / n) for g, c, n, mean, m2 in self.calls]


class GroupNormSync(TorchFunctionMode):
    """While active (``with``), GroupNorm calls use the given statistics and/or feed an accumulator.

    Calls are counted from 0 each time the mode is entered (enter it once per tile). Call ``k <
    len(stats)`` normalises with ``stats[k]``; later calls with their own statistics, and, with a
    ``collect`` accumulator, merge their input's statistics over ``region`` (the owned part of a tile
    of input size ``tile``) into it; after collecting call ``stop_after`` it abandons the tile's
    forward (:class:`TileDone`), whose rest is not needed.
    """

    def __init__(
        self,
        stats: list[GroupStats] | None = None,
        collect: _Accumulator | None = None,
        region: Region | None = None,
        tile: tuple[int, int] | None = None,
        stop_after: int | None = None,
    ) -> None:
        super().__init__()
        self.stats = stats or []
        self.collect = collect
        self.region = region
        self.tile = tile
        self.stop_after = stop_after
        self.calls = 0

    def __enter__(self) -> GroupNormSync:
        self.calls = 0
        return super().__enter__()  # type: ignore[return-value]

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _GROUP_NORMS:
            return func(*args, **kwargs)
        x, groups, weight, bias, eps = _group_norm_args(args, kwargs)
        k = self.calls
        self.calls += 1
        if k < len(self.stats):
            return _normalise(x, groups, weight, bias, eps, self.stats[k], k)
        if self.collect is not None:
            owned = self._owned(x).reshape(x.shape[0], groups, -1)
            self.collect.add(k - len(self.stats), groups, x.shape[1], owned)
            if self.stop_after is not None and k >= self.stop_after:
                raise TileDone
        return func(*args, **kwargs)

    def _owned(self, x: Tensor) -> Tensor:
        """The owned part of a GroupNorm input at its own resolution, as float32 (B, C, n)."""
        b, c = x.shape[:2]
        if self.region is None or self.tile is None or x.ndim < 3:
            return x.float().reshape(b, c, -1)
        th, tw = self.tile
        if x.ndim == 3:  # attention's norm of (B, C, h*w) tokens: unflatten with the tile's aspect
            h = round((x.shape[-1] * th / tw) ** 0.5)
            if h == 0 or x.shape[-1] % h or (x.shape[-1] // h) * th != h * tw:
                return x.float().reshape(b, c, -1)  # not a spatial layout this tile explains: all of it
            x4 = x.reshape(b, c, h, x.shape[-1] // h)
        else:
            x4 = x.reshape(b, c, -1, x.shape[-2], x.shape[-1])  # extra leading dims (e.g. time) kept
        h, w = x4.shape[-2:]
        y0, y1, x0, x1 = self.region
        part = x4[..., _at(y0, h, th) : _at(y1, h, th), _at(x0, w, tw) : _at(x1, w, tw)]
        return part.float().reshape(b, c, -1)


def _at(pos: int, size: int, tile: int) -> int:
    """A tile coordinate at an activation's resolution, rounded half up: neighbouring tiles whose
    starts are whole activation pixels apart cut at the same image position."""
    return math.floor(pos * size / tile + 0.5)


class TileDone(Exception):
    """Raised inside a statistics pass once the GroupNorm calls it needs have been collected."""


def _group_norm_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, int, Any, Any, float]:
    """(input, num_groups, weight, bias, eps) of ``F.group_norm`` / ``torch.group_norm`` arguments."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return (
        values["input"],
        int(values["num_groups"]),
        values.get("weight"),
        values.get("bias"),
        float(values.get("eps", 1e-5)),
    )


def _normalise(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, s: GroupStats, k: int
) -> Tensor:
    """GroupNorm of ``x`` with given per-(sample, group) mean / variance: one fused ``x * a + b`` in
    float32 with per-(sample, channel) ``a``, ``b`` folding the statistics and the affine weights."""
    _check_same(k, (s.groups, s.channels, s.mean.shape[0]), (groups, x.shape[1], x.shape[0]))
    b, c = x.shape[:2]
    scale = torch.rsqrt(s.var + eps).repeat_interleave(c // groups, dim=1)  # (B, C)
    shift = -s.mean.repeat_interleave(c // groups, dim=1) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    shape = (b, c) + (1,) * (x.ndim - 2)
    y = torch.addcmul(shift.reshape(shape), x.float(), scale.reshape(shape))
    # autocast runs group_norm in float32 and returns float32; without it, the input's dtype
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def _check_same(k: int, seen: tuple[int, int, int], now: tuple[int, int, int]) -> None:
    if seen != now:
        raise RuntimeError(
            f"GroupNorm call {k} differs between tiles (groups, channels, batch) {seen} vs {now}: the "
            "tiled function must make the same GroupNorm calls on every tile; use vae_norm='per_tile'"
        )


@torch.no_grad()
def collect_group_stats(
    fn: Callable[[Tensor], Any],
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    align: int = 1,
    passes: int = 1,
) -> list[GroupStats]:
    """Image-wide statistics of every GroupNorm call ``fn`` makes, from up to ``passes`` passes over
    the tiles :func:`blend_tiles` would cut.

    Pass ``p`` normalises the first ``p - 1`` calls with the exact statistics of the earlier passes
    and the rest with each tile's own, and collects calls ``p, p + 1, ...``: call ``p``'s statistics
    are then exact, the later ones estimates. Returns the exact ones followed by the last pass's
    estimates; stops early once every call is exact. The statistics are constants for autograd.
    """
    _, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap, align), tile_starts(w, tw, overlap, align)
    ycuts, xcuts = tile_cuts(ys, th, h), tile_cuts(xs, tw, w)
    exact: list[GroupStats] = []
    estimates: list[GroupStats] = []
    for p in range(passes):
        acc = _Accumulator()
        stop = None if p == passes - 1 else len(exact)  # only the last pass needs the estimates
        counts: set[int] = set()
        for y, (cy0, cy1) in zip(ys, ycuts, strict=True):
            for x0, (cx0, cx1) in zip(xs, xcuts, strict=True):
                mode = GroupNormSync(exact, acc, (cy0 - y, cy1 - y, cx0 - x0, cx1 - x0), (th, tw), stop)
                try:
                    with mode:
                        fn(x[..., y : y + th, x0 : x0 + tw])
                except TileDone:
                    pass
                counts.add(mode.calls)
        if len(counts) > 1:
            raise RuntimeError(
                f"the tiled function made {sorted(counts)} GroupNorm calls on different tiles: it must make "
                "the same GroupNorm calls on every tile; use vae_norm='per_tile'"
            )
        found = acc.finish()
        if not found:  # every call is exact already (or fn makes none)
            break
        exact.append(found[0])
        estimates = found[1:]
    return exact + estimates


def blend_tiles_synced(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    align: int = 1,
    passes: int = 1,
) -> Tensor:
    """:func:`blend_tiles` (ramp weights) with every GroupNorm inside ``fn`` using image-wide statistics.

    ``passes`` statistics passes precede the output pass (>= 1). An input no larger than one tile
    is passed to ``fn`` whole (its GroupNorm statistics are then the image's own).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return blend_tiles(fn, x, tile=tile, overlap=overlap, scale=scale, weight="ramp", align=align)[0]
    stats = collect_group_stats(fn, x, tile=tile, overlap=overlap, align=align, passes=passes)

    def synced(t: Tensor) -> Tensor:
        mode = GroupNormSync(stats)
        with mode:
            out = fn(t)
        if mode.calls != len(stats):
            raise RuntimeError(
                f"the tiled function made {len(stats)} GroupNorm calls per tile, then {mode.calls}: it must "
                "make the same GroupNorm calls on every tile; use vae_norm='per_tile'"
            )
        return out

    return blend_tiles(synced, x, tile=tile, overlap=overlap, scale=scale, weight="ramp", align=align)[0]


__all__ = ["GroupNormSync", "GroupStats", "TileDone", "blend_tiles_synced", "collect_group_stats"]
