"""Tiled inference: tile geometry, blending invariants, stitched rescaler tiles, tiled vs whole."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.components.aligners.fixed import FixedTimestep
from tadm.components.rescalers.dfrm import DFRM
from tadm.contracts import DiffusionBackbone, TimestepAligner
from tadm.evaluation.metrics import psnr_y
from tadm.inference import pipeline
from tadm.inference.groupnorm_sync import blend_tiles_synced, collect_group_stats
from tadm.inference.heatmap import heat_map
from tadm.inference.tiling import (
    NO_TILING,
    Tiling,
    blend_tiles,
    stitch_tiles,
    tile_starts,
    tile_weight,
    timestep_map,
)
from tadm.model import TADMModel
from tadm.testing.twins.unet_twins import StableDiffusionTwin
from tadm.training.lightning_module import TADMModule


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [(540, 96, 32), (256, 96, 32), (97, 96, 32), (50, 96, 32)]
)
def test_tile_starts_cover_with_overlap_and_end_at_the_edge(size: int, tile: int, overlap: int) -> None:
    starts = tile_starts(size, min(tile, size), overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    for a, b in zip(starts, starts[1:], strict=False):
        assert a < b and a + t - b >= overlap  # neighbours overlap by at least `overlap`
    assert len(starts) == (1 if size <= tile else math.ceil((size - tile) / (tile - overlap)) + 1)


def test_tile_starts_respect_alignment() -> None:
    starts = tile_starts(1000, 512, 64, align=8)
    assert all(s % 8 == 0 for s in starts) and starts[-1] + 512 == 1000


def test_gaussian_weights_follow_tadm_and_ramps_stay_positive() -> None:
    w = tile_weight(96, 96, "gaussian", var=0.01)
    assert w.shape == (96, 96) and w[47, 47] == w.max() and torch.equal(w, w.T)
    # sigma^2 = 0.01 on tile-normalised coordinates (x - centre) / 96: the edge is ~5e-6 of the centre
    expected = math.exp(-((47.5 / 96) ** 2 - (0.5 / 96) ** 2) / 0.02)
    assert (w[0, 48] / w[48, 48]).item() == pytest.approx(expected, rel=1e-3)
    r = tile_weight(64, 64, "ramp", overlap=16)
    assert r.min() > 0 and r[32, 32] == 1.0 and r[0, 32] < r[8, 32] < r[16, 32]


@pytest.mark.parametrize("weight", ["gaussian", "ramp"])
def test_blending_a_pointwise_function_is_exact(weight: str) -> None:
    x = torch.randn(2, 3, 70, 45)
    (out,) = blend_tiles(lambda t: t * 2 + 1, x, tile=32, overlap=8, weight=weight)  # type: ignore[arg-type]
    torch.testing.assert_close(out, x * 2 + 1, atol=1e-5, rtol=1e-5)


def test_blending_with_scale_and_batched_tiles_matches_whole() -> None:
    x = torch.randn(1, 4, 40, 56)

    def up(t: Tensor) -> tuple[Tensor, Tensor]:
        big = F.interpolate(t, scale_factor=8, mode="nearest")
        return big, big.mean(dim=1, keepdim=True)

    whole = up(x)
    for batch in (1, 3):
        tiled = blend_tiles(up, x, tile=16, overlap=8, scale=8, weight="ramp", batch=batch)
        for a, b in zip(tiled, whole, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (down,) = blend_tiles(lambda t: F.avg_pool2d(t, 8), whole[0], tile=128, overlap=32, scale=1 / 8, align=8)
    torch.testing.assert_close(down, x, atol=1e-5, rtol=1e-5)


def test_extras_are_cropped_alongside() -> None:
    x, e = torch.randn(1, 2, 50, 50), torch.randn(1, 2, 50, 50)
    (out,) = blend_tiles(lambda t, u: t - u, x, tile=20, overlap=6, extras=[e])
    torch.testing.assert_close(out, x - e, atol=1e-5, rtol=1e-5)


def test_stitched_tiles_equal_whole_for_a_local_network() -> None:
    """Overlap beyond the receptive field: stitching (no blending) reproduces the whole-image result."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.PixelUnshuffle(2)
    )
    x = torch.randn(1, 3, 2 * 53, 2 * 37)  # grid = the unshuffled size 53 x 37

    with torch.no_grad():
        whole = net(x)
        tiled = stitch_tiles(net, [x], [2], (53, 37), 1, tile=16, overlap=4)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    # quantised outputs stay quantised: no output pixel is a mix of two tiles. Integer weights and inputs
    # make every sum exact in float32, so equality holds whatever order a machine's conv kernels sum in.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())
        xi = torch.randint(-3, 4, x.shape).float()
        q = lambda t: net(t) // 3  # noqa: E731
        assert torch.equal(stitch_tiles(q, [xi], [2], (53, 37), 1, tile=16, overlap=4), q(xi))


def test_stitch_overlap_of_half_a_tile_or_more_is_refused() -> None:
    """Each stitched tile carries its overlap on both sides, so 2 x overlap >= tile would step one pixel at a
    time (quadratically many tiles): refused with a message naming the bound, in the Tiling (the commands'
    --lr-tile / --lr-overlap) and in stitch_tiles itself; half a tile minus one still works."""
    with pytest.raises(ValueError, match=r"lr_overlap must be below half of lr_tile.*at most 15, got 16"):
        Tiling(lr_tile=32, lr_overlap=16)
    assert Tiling(lr_tile=32, lr_overlap=15).lr_overlap == 15
    calls: list[tuple[int, ...]] = []

    def fn(t: Tensor) -> Tensor:
        calls.append(tuple(t.shape))
        return t

    x = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match="overlap must be below half of tile"):
        stitch_tiles(fn, [x], [1], (20, 20), 1, tile=8, overlap=4)
    assert not calls
    assert torch.equal(stitch_tiles(fn, [x], [1], (20, 20), 1, tile=8, overlap=3), x)
    assert len(calls) == 49  # starts 0, 2, ..., 12 on each axis: a stride of tile - 2 overlap = 2
    assert torch.equal(
        stitch_tiles(fn, [x], [1], (20, 20), 1, tile=20, overlap=10), x
    )  # one tile: no stitching


@pytest.mark.parametrize(("argv", "lr_tile", "lr_overlap"), [([], 128, 16), (["--lr-tile", "8"], 8, 3),
    (["--lr-tile", "8", "--lr-overlap", "1"], 8, 1), (["--lr-tile", "0"], 0, 0)])  # fmt: skip
def test_command_lr_overlap_defaults_below_half_the_tile(
    argv: list[str], lr_tile: int, lr_overlap: int
) -> None:
    """`--lr-tile` alone works at any size (the overlap defaults to 16, or the most a small tile allows);
    an explicit `--lr-overlap` of half the tile is refused naming both options' values."""
    import argparse

    from tadm.commands.common import add_model_arguments, tiling_from_args

    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    tiling = tiling_from_args(ap.parse_args(["--ckpt", "x.ckpt", *argv]))
    assert (tiling.lr_tile, tiling.lr_overlap) == (lr_tile, lr_overlap)
    with pytest.raises(ValueError, match="lr_tile=8 allows at most 3, got 4"):
        tiling_from_args(ap.parse_args(["--ckpt", "x.ckpt", "--lr-tile", "8", "--lr-overlap", "4"]))


def test_timestep_maps_and_heat_map() -> None:
    m = timestep_map(torch.tensor([10.0, 200.0]), (3, 4))
    assert m.shape == (2, 1, 3, 4) and m[1].unique().item() == 200.0
    ramp = torch.linspace(10, 200, 16).reshape(1, 1, 4, 4)
    heat = heat_map(ramp, 10, 200)
    assert heat.shape == (1, 3, 4, 4) and heat.min() >= 0 and heat.max() <= 1
    lum = (0.299 * heat[0, 0] + 0.587 * heat[0, 1] + 0.114 * heat[0, 2]).flatten()
    assert (lum[1:] >= lum[:-1] - 1e-6).all()  # viridis: brightness grows with t


def test_tiling_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="latent_overlap"):
        Tiling(latent_tile=32, latent_overlap=32)
    with pytest.raises(ValueError, match="tile_batch"):
        Tiling(tile_batch=0)
    with pytest.raises(ValueError, match="vae_norm"):
        Tiling(vae_norm="whole")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vae_norm_passes"):
        Tiling(vae_norm_passes=0)


# ------------------------------------------------------------------ GroupNorm statistics over all tiles
class TokenNorm(nn.Module):
    """GroupNorm of (B, C, h*w) tokens, the way diffusers' VAE attention block calls it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(2)).reshape(x.shape)


def _local_norm_net() -> nn.Module:
    """Convolutions, GroupNorms (one on tokens) and an upsampling: local except for the norms."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1), TokenNorm(16), nn.SiLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1),
    ).eval()  # fmt: skip


def test_synced_group_norm_statistics_are_the_whole_images(photo: Tensor) -> None:
    """Enough passes give every GroupNorm exactly the whole image's statistics; tiles then agree."""
    net, whole_stats = _local_norm_net(), []

    def record(module: nn.Module, inputs: tuple[Tensor]) -> None:
        g = inputs[0].reshape(inputs[0].shape[0], module.num_groups, -1)  # type: ignore[union-attr]
        whole_stats.append((g.mean(-1), g.var(-1, unbiased=False)))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, nn.GroupNorm)]
    x = torch.cat([photo, photo.flip(-1)])  # two samples: statistics are per sample
    with torch.no_grad():
        whole = net(x)
        for h in hooks:
            h.remove()
        geometry = dict(tile=64, overlap=32)  # 4 x 7 tiles; the owned parts are 16 px from inner edges
        exact = collect_group_stats(net, x, **geometry, passes=3)
        one_pass = collect_group_stats(net, x, **geometry, passes=1)
        synced = blend_tiles_synced(net, x, **geometry, scale=2, passes=3)
        (per_tile,) = blend_tiles(net, x, **geometry, scale=2, weight="ramp")
    assert len(exact) == len(one_pass) == len(whole_stats) == 3
    for s, (mean, var) in zip(exact, whole_stats, strict=True):
        torch.testing.assert_close(s.mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.var, var, atol=1e-5, rtol=1e-4)
    # one pass: the first norm is exact, later ones are estimates from per-tile-normalised inputs
    torch.testing.assert_close(one_pass[0].var, whole_stats[0][1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(one_pass[2].var, whole_stats[2][1], rtol=1e-3)
    # what is left is the blending of the few pixels near tile edges that see zero padding
    err_synced, err_tile = (synced - whole).abs().mean(), (per_tile - whole).abs().mean()
    assert err_synced < err_tile / 20, (err_synced.item(), err_tile.item())


def test_vae_norm_is_a_command_line_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import tadm.model.loading
    from tadm.commands.common import add_model_arguments, load_from_args

    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    monkeypatch.setattr(tadm.model.loading, "load_codec", lambda ckpt, *, tiling, **kw: tiling)
    assert load_from_args(ap.parse_args(["--ckpt", "c"])).vae_norm == "synced"  # type: ignore[attr-defined]
    tiling = load_from_args(ap.parse_args(["--ckpt", "c", "--vae-norm", "per_tile"]))
    assert tiling.vae_norm == "per_tile"  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        ap.parse_args(["--ckpt", "c", "--vae-norm", "whole"])


def test_synced_mode_checks_the_calls_and_passes_small_inputs_whole() -> None:
    net = _local_norm_net()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():  # one tile: the network's own GroupNorm, nothing collected
        torch.testing.assert_close(blend_tiles_synced(net, x, tile=64, overlap=16, scale=2), net(x))
        # a function whose GroupNorm calls change between tiles is refused, not averaged
        groups = iter([2, 4])
        with pytest.raises(RuntimeError, match="GroupNorm call 0 differs between tiles"):
            collect_group_stats(
                lambda t: F.group_norm(t, next(groups, 4)), torch.randn(1, 4, 40, 40), tile=24, overlap=8
            )
        nets = iter([net, net[:3]])
        with pytest.raises(RuntimeError, match=r"made \[1, 3\] GroupNorm calls"):
            collect_group_stats(lambda t: next(nets, net)(t), x, tile=24, overlap=8)


# ---------------------------------------------------------------------------------- on a tiny model
class LocalToyBackbone(DiffusionBackbone):
    """A tiny backbone made only of small convolutions (receptive field of a few pixels).

    Random-weight SD UNets and VAEs are global within a tile (self-attention, GroupNorm), so tiled
    and whole results differ by what the *network* sees, not by how tiles are cut and blended
    (measured on tiny-sd21: ~19 dB enhancer, ~25 dB VAE decode, even with whole-image GroupNorm
    statistics). This backbone isolates the tiling mechanics: with overlaps wider than its receptive
    field, tiling must reproduce the whole-image result.
    """

    latent_channels = 4
    downsample_factor = 8

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PixelUnshuffle(8), nn.Conv2d(512, 4, 1))
        self.dec = nn.Sequential(
            nn.Conv2d(4, 192, 3, padding=1), nn.PixelShuffle(8), nn.Conv2d(3, 3, 3, padding=1)
        )
        self.unet = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)
        self.prediction_type = "epsilon"
        self.requires_grad_(False)

    @property
    def backbone_id(self) -> str:
        return "test:local-toy"

    def load(self, parts: object) -> None:
        return None

    def encode(self, x: Tensor) -> Tensor:
        return self.enc(x)

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(self.dec(z))

    def predict(self, z: Tensor, t: Tensor) -> Tensor:
        return self.unet(z) * (1 + t.float()[:, None, None, None] / 1000)


def _tiny_enhancer(aligner: nn.Module, backbone: DiffusionBackbone | None = None) -> TADMModel:
    torch.manual_seed(0)
    m = TADMModel(
        backbone=backbone or LocalToyBackbone(),
        rescaler=DFRM(scale=16, width=16, num_resblocks=1, num_couplings=2),
        stage="enhancer",
        aligner=aligner,  # type: ignore[arg-type]
    )
    return m.load_parts().eval()


def _tiny_module(aligner: nn.Module, color_fix: str = "none") -> TADMModule:
    """The training wrapper around the same tiny parts, for what validation does (evaluate_batch, logging)."""
    torch.manual_seed(0)
    module = TADMModule(
        backbone=LocalToyBackbone(),
        rescaler=DFRM(scale=16, width=16, num_resblocks=1, num_couplings=2),
        stage="enhancer",
        aligner=aligner,  # type: ignore[arg-type]
        loss_weights={"pixel": 1.0},
        color_fix=color_fix,  # type: ignore[arg-type]
    )
    module.configure_model()
    return module.eval()


@pytest.fixture(scope="module")
def photo() -> Tensor:
    from tadm.datamodules.image_io import load_image
    from tests.helpers import SAMPLES

    img = load_image(SAMPLES / "train" / "astronaut.png")
    return F.interpolate(img[None], size=(200, 296), mode="area")  # not a multiple of 16: padded inside


def test_tiled_and_whole_round_trips_agree_above_35_db(photo: Tensor, one_thread: None) -> None:
    """Acceptance: tiles (enhancer, VAE and rescaler) vs the whole image, fixed aligner, >= 35 dB, no seams."""
    m = _tiny_enhancer(FixedTimestep(200.0))
    tiling = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, lr_tile=10, lr_overlap=3)
    # really tiled: several tiles in each direction
    assert len(tile_starts(208 // 8, 16, 8)) * len(tile_starts(304 // 8, 16, 8)) > 4
    whole = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, NO_TILING)
    tiled = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, tiling)
    assert tiled.reconstruction.shape == photo.shape
    agreement = psnr_y(tiled.reconstruction, whole.reconstruction).item()
    assert agreement >= 35.0, agreement
    # no seams: the error along tile borders is no larger than elsewhere
    err = (tiled.reconstruction - whole.reconstruction).abs().mean(dim=(0, 1))
    cols = [s * 8 + 64 for s in tile_starts(304 // 8, 16, 8)[1:]]  # centres of the overlaps (pixels)
    border = err[:, [c for c in cols if c < err.shape[1]]].mean()
    assert border <= 3 * err.mean() + 1e-4, (border.item(), err.mean().item())
    # the LR image, stitched from rescaler tiles, is still exactly 8-bit
    v = (tiled.lr + 1) * 127.5
    assert torch.equal(v, v.round())
    # DFRM's receptive field is wider than 3 LR pixels: stitched tiles round a few values differently
    assert (tiled.lr == whole.lr).float().mean() > 0.75
    assert ((tiled.lr - whole.lr).abs().max() * 127.5).round() <= 3


@pytest.mark.parametrize("color_fix", ["wavelet", "adain"])
def test_colour_fix_is_tile_safe(photo: Tensor, color_fix: str, one_thread: None) -> None:
    """The fix runs once on the blended image: tiled vs whole stays within the pipeline's bound, with no
    seams, and the module's ``color_fix`` option is what validation reconstructs with."""
    from tadm.ops.color_fix import apply_color_fix

    module = _tiny_module(FixedTimestep(200.0), color_fix)
    m = module.model
    tiling = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, lr_tile=10, lr_overlap=3)
    whole = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, NO_TILING, color_fix=color_fix)
    tiled = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, tiling, color_fix=color_fix)
    assert tiled.reconstruction.shape == photo.shape and tiled.reconstruction.abs().max() <= 1
    agreement = psnr_y(tiled.reconstruction, whole.reconstruction).item()
    assert agreement >= 35.0, agreement
    err = (tiled.reconstruction - whole.reconstruction).abs().mean(dim=(0, 1))
    cols = [s * 8 + 64 for s in tile_starts(304 // 8, 16, 8)[1:]]
    border = err[:, [c for c in cols if c < err.shape[1]]].mean()
    assert border <= 3 * err.mean() + 1e-4, (border.item(), err.mean().item())
    # it is the fix of the uncorrected reconstruction against the bicubic upscale of the same LR image
    plain = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, tiling)
    reference = pipeline.color_reference(tiled.lr, 16, (200, 296))
    expected = apply_color_fix(plain.reconstruction, reference, color_fix)
    torch.testing.assert_close(tiled.reconstruction, expected, atol=1e-5, rtol=0)
    assert (tiled.reconstruction - plain.reconstruction).abs().mean() > 1e-3  # it did something
    # validation / test use the module option
    module.eval_tiling = tiling
    torch.testing.assert_close(module.evaluate_batch(photo)["_reconstruction"], tiled.reconstruction)
    with pytest.raises(ValueError, match="unknown colour fix"):
        TADMModule(backbone=LocalToyBackbone(), rescaler=m.rescaler, color_fix="histogram")  # type: ignore[arg-type]


class ContentAligner(TimestepAligner):
    """t from the tile's content (its mean brightness in latent space), clearly different per tile."""

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return 100 + 90 * torch.tanh(z_hat.float().mean(dim=(1, 2, 3)) * 10)


def test_each_tile_gets_its_own_timestep(photo: Tensor, one_thread: None) -> None:
    """A scalar aligner on tiles gives a smooth map whose values are the tiles' own t."""
    aligner = ContentAligner()
    m = _tiny_enhancer(aligner)
    tiling = Tiling(latent_tile=12, latent_overlap=4, vae_tile=0, lr_tile=0)
    # on the HR latent, whose tiles differ clearly (an untrained DFRM's z_hat hardly varies)
    with torch.no_grad():
        z = m.backbone.encode(F.pad(photo, (0, 8, 0, 8), mode="reflect"))
    up = pipeline.enhance_and_decode(m.backbone, m.rescaler, z, (200, 296), m.enhance_fn, tiling)
    t = up.timesteps
    assert t is not None and t.shape == (1, 1, 208 // 8, 304 // 8)
    assert t.min() >= 10 - 1e-3 and t.max() <= 190 + 1e-3
    assert t.max() - t.min() > 5  # different tiles, different timesteps
    # the map is the Gaussian-weighted blend of each tile's own timestep
    num, den = torch.zeros(26, 38), torch.zeros(26, 38)
    w = tile_weight(12, 12, "gaussian", var=0.01)
    for y in tile_starts(26, 12, 4):
        for x in tile_starts(38, 12, 4):
            num[y : y + 12, x : x + 12] += w * aligner(z[..., y : y + 12, x : x + 12]).item()
            den[y : y + 12, x : x + 12] += w
    torch.testing.assert_close(t[0, 0], num / den, atol=1e-3, rtol=1e-4)
    assert t[0, 0, 6, 6].item() == pytest.approx(
        aligner(z[..., :12, :12]).item(), abs=1e-2
    )  # a tile's centre
    # and the timestep of a whole-image run is one value
    whole = pipeline.enhance_and_decode(m.backbone, m.rescaler, z, (200, 296), m.enhance_fn, NO_TILING)
    assert whole.timesteps is not None and whole.timesteps.unique().numel() == 1


def _tiny_vae_agreement(photo: Tensor, *modes: tuple[str, int]) -> list[tuple[float, float]]:
    """diffusers' AutoencoderKL (tiny-sd21) through the pipeline, 3 x 4 tiles of 128 px: PSNR-Y against the
    whole-image round trip of (tiled encode + whole decode, whole encode + tiled decode) per (norm, passes).

    Random residual branches make a random VAE's tiles differ mostly through receptive field and
    attention, not GroupNorm (see LocalToyBackbone), so they are scaled down here, as a trained VAE's
    are well-conditioned; benchmarks/vae_tiling.py measures a VAE trained on photos.
    """
    bb = StableDiffusionTwin("tiny-sd21")
    bb.load(["vae"])
    assert bb.vae is not None
    out = []
    with torch.no_grad():
        for name, p in bb.vae.named_parameters():
            if name.endswith(("conv2.weight", "conv2.bias", "to_out.0.weight", "to_out.0.bias")):
                p.mul_(0.03)
        x = F.pad(photo, (0, 8, 0, 8), mode="reflect")  # 208 x 304: 3 x 4 tiles of 128 px
        z = pipeline.encode(bb, x)
        whole = pipeline.decode(bb, z)
        for norm, passes in modes:
            t = Tiling(vae_tile=128, vae_overlap=64, vae_norm=norm, vae_norm_passes=passes)  # type: ignore[arg-type]
            encoded = psnr_y(pipeline.decode(bb, pipeline.encode(bb, x, t)), whole).item()
            out.append((encoded, psnr_y(pipeline.decode(bb, z, t), whole).item()))
    return out


def test_synced_vae_tiles_agree_with_the_whole_image_on_a_tiny_sd_vae(
    photo: Tensor, one_thread: None
) -> None:
    """Image-wide GroupNorm statistics (one pass, the default) bring the encoder's tiles several dB closer to
    the whole-image encode than per-tile statistics."""
    per_tile, synced = _tiny_vae_agreement(photo, ("per_tile", 1), ("synced", 1))
    assert synced[0] >= per_tile[0] + 6, (per_tile, synced)


@pytest.mark.slow  # ~10 s of a `make test` worker: a statistics pass per GroupNorm call, encoder and decoder
def test_exact_vae_statistics_bring_encoder_and_decoder_tiles_close(photo: Tensor, one_thread: None) -> None:
    """Every statistic exact (as many passes as GroupNorm calls; test_synced_group_norm_statistics_are_the_
    whole_images checks exactness on a toy): the decoder's tiles too come several dB closer."""
    per_tile, exact = _tiny_vae_agreement(photo, ("per_tile", 1), ("synced", 99))
    assert exact[0] >= per_tile[0] + 6 and exact[1] >= per_tile[1] + 6, (per_tile, exact)


def test_tiled_round_trip_runs_on_a_tiny_stable_diffusion(photo: Tensor, one_thread: None) -> None:
    """The same code path on a real diffusers UNet/VAE: shapes, range, per-tile timesteps of a spatial aligner."""
    from tadm.components.aligners.spatial_tpm import SpatialTPM

    m = _tiny_enhancer(SpatialTPM(), StableDiffusionTwin("tiny-sd21"))
    tiling = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, lr_tile=8, lr_overlap=3)
    rt = pipeline.round_trip(m.backbone, m.rescaler, photo, m.enhance_fn, tiling)
    assert rt.reconstruction.shape == photo.shape and rt.reconstruction.abs().max() <= 1
    assert rt.timesteps is not None and rt.timesteps.shape == (1, 1, 26, 38)
    assert torch.isfinite(rt.reconstruction).all() and rt.timesteps.std() > 0


def test_tensorboard_shows_the_timestep_heat_map_beside_the_reconstruction(
    photo: Tensor, tmp_path: Path, one_thread: None
) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = _tiny_module(ContentAligner())
    m.eval_tiling = Tiling(latent_tile=12, latent_overlap=4, vae_tile=0, lr_tile=0)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    m._trainer = SimpleNamespace(logger=logger, loggers=[logger], sanity_checking=False, global_step=0)  # type: ignore[assignment]
    out = m.evaluate_batch(photo)
    assert out["_timesteps"].shape == (1, 1, 26, 38) and out["t_mean"].shape == (1,)
    m._log_images("val", 0, photo, out["_lr"], out["_reconstruction"], out["_timesteps"])
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    (img,) = acc.Images("val/hr_lr_reconstruction/0")
    assert img.width > 4 * photo.shape[-1] and img.height >= photo.shape[-2]  # HR | LR | rec | heat map
    assert "val/timesteps/0" in acc.Tags()["histograms"]
