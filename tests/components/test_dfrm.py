"""DFRM: invertibility, parameter counts, shapes, quantisation, and that stage 1 learns."""

from __future__ import annotations

import pytest
import torch

from tadm.components.backbones.space_to_depth import SpaceToDepthBackbone
from tadm.components.rescalers.dfrm import DFRM
from tadm.contracts import quantize_8bit
from tadm.inference import pipeline
from tadm.ops.blocks import AffineCoupling, InvertibleNet
from tadm.ops.images import bicubic_down, bicubic_resize
from tadm.training.losses import DEFAULT_STAGE1_WEIGHTS, get_distance, weighted_sum

TINY = dict(width=16, num_resblocks=1, pixel_width=4, num_couplings=2, coupling_growth=8)


def _randomise(module: torch.nn.Module, std: float = 0.1) -> None:
    """Couplings start as the identity (zero-init last conv); perturb them so inversion is tested."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


#: float32 rounding in one coupling: each conv output sums ~fan_in products, each rounded at eps
F32_EPS = torch.finfo(torch.float32).eps


def _f32_bound(net: torch.nn.Module, blocks: int, *tensors: torch.Tensor) -> float:
    """What float32 arithmetic can legitimately lose in a round trip through ``blocks`` couplings, each
    applied and undone (rounding ~ eps * sqrt(fan_in) relative to the largest value, twice per block):
    a bound that follows from the arithmetic, not from one machine's rounding."""
    fan_in = max(m.weight[0].numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    scale = max(float(t.abs().max()) for t in tensors)
    return 2 * blocks * F32_EPS * fan_in**0.5 * scale


def test_coupling_inverts_exactly_in_float64_and_to_rounding_in_float32() -> None:
    block = AffineCoupling(channels=3, split=1, growth=32)
    _randomise(block)
    x = torch.randn(2, 3, 17, 23)
    y = block(x)
    assert (y - x).abs().max() > 1e-2  # really transforms
    assert (block.inverse(y) - x).abs().max() < _f32_bound(block, 1, x, y)
    block64, x64 = block.double(), x.double()
    assert (block64.inverse(block64(x64)) - x64).abs().max() < 1e-12  # exact up to float64 rounding


def test_invertible_net_inverts_both_ways() -> None:
    net = InvertibleNet(num_blocks=12)
    _randomise(net, 0.05)
    x = torch.randn(2, 3, 16, 16)
    y = net(x)
    bound = _f32_bound(net, 12, x, y)
    assert (net.inverse(y) - x).abs().max() < bound
    assert (net(net.inverse(x)) - x).abs().max() < bound
    net64, x64 = net.double(), x.double()
    assert (net64.inverse(net64(x64)) - x64).abs().max() < 1e-10  # exact but for float64 rounding
    assert (net64(net64.inverse(x64)) - x64).abs().max() < 1e-10


@pytest.mark.parametrize(("scale", "millions"), [(16, 12.2), (32, 18.1)])
def test_parameter_count_matches_release(scale: int, millions: float) -> None:
    n = sum(p.numel() for p in DFRM(scale=scale, latent_channels=4).parameters()) / 1e6
    assert abs(n - millions) / millions < 0.05, n


@pytest.mark.parametrize("scale", [16, 32])
@pytest.mark.parametrize("latent_channels", [4, 192])
def test_shapes_on_odd_sizes(scale: int, latent_channels: int) -> None:
    m = DFRM(scale=scale, latent_channels=latent_channels, **TINY).eval()
    backbone = SpaceToDepthBackbone() if latent_channels == 192 else None
    x = torch.rand(1, 3, 37, 71) * 2 - 1
    if backbone is None:  # a 4-channel latent of the right layout, as an SD VAE would give
        xp, _ = pipeline.pad_to_multiple(x, scale)
        z = torch.randn(1, 4, xp.shape[-2] // 8, xp.shape[-1] // 8)
        y = m.downscale(xp, z)
        assert y.shape == (1, 3, xp.shape[-2] // scale, xp.shape[-1] // scale)
        assert m.upscale(y).shape == z.shape
        return
    rt = pipeline.round_trip(backbone, m, x)
    pad = -(-37 // scale) * scale, -(-71 // scale) * scale
    assert rt.lr.shape == (1, 3, pad[0] // scale, pad[1] // scale)
    assert rt.reconstruction.shape == x.shape


def test_wrong_latent_shape_is_a_clear_error() -> None:
    m = DFRM(scale=16, latent_channels=4, **TINY)
    with pytest.raises(ValueError, match="latent shape"):
        m.downscale(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="not a multiple of the scale 16"):
        m.downscale(torch.zeros(1, 3, 40, 32), torch.zeros(1, 4, 5, 4))


def test_quantisation_eval_rounds_train_adds_bounded_noise() -> None:
    y = torch.rand(2, 3, 8, 8) * 2.2 - 1.1
    q = quantize_8bit(y, training=False)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert q.min() >= -1 and q.max() <= 1
    inside = y.clamp(-0.99, 0.99)
    noisy = quantize_8bit(inside, training=True)
    assert (noisy - inside).abs().max() <= 1.0 / 255 + 1e-6
    assert not torch.allclose(noisy, quantize_8bit(inside, training=False))
    ste = quantize_8bit(inside.requires_grad_(), training=True, mode="ste")
    ste.sum().backward()
    assert torch.allclose(inside.grad, torch.ones_like(inside))


def test_eval_lr_is_exactly_8bit_and_deterministic() -> None:
    m = DFRM(scale=16, latent_channels=192, **TINY).eval()
    b = SpaceToDepthBackbone()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y1, y2 = m.downscale(x, b.encode(x)), m.downscale(x, b.encode(x))
    assert torch.equal(y1, y2)
    levels = (y1 + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_final_activation_option() -> None:
    assert isinstance(DFRM(16, **TINY).decoder[-1], torch.nn.Conv2d)
    assert isinstance(DFRM(16, final_activation=True, **TINY).decoder[-1][-1], torch.nn.LeakyReLU)


def test_stage1_loss_decreases_on_fixed_batch(samples) -> None:
    from tadm.datamodules.image_io import load_image

    x = load_image(samples / "val" / "chelsea.png")[:, :64, :128].unsqueeze(0)
    b = SpaceToDepthBackbone()
    m = DFRM(scale=16, latent_channels=192, width=32, num_resblocks=2, pixel_width=8, num_couplings=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    dist = get_distance("mse")
    losses = []
    for _ in range(40):
        loss = weighted_sum(m.training_losses(x, b.encode(x), dist), DEFAULT_STAGE1_WEIGHTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_bicubic_skip_starts_exactly_at_bicubic_down_and_up() -> None:
    """With the residual heads at zero, the LR file is the 8-bit bicubic LR image and the reconstruction
    is its bicubic upscale: training can only add to the bicubic baseline, never start below it."""
    from tadm.inference.pipeline import bicubic_round_trip

    backbone = SpaceToDepthBackbone()
    m = DFRM(scale=16, latent_channels=192, bicubic_skip=True, **TINY).eval()
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    y = m.downscale(x, backbone.encode(x))
    torch.testing.assert_close(y, quantize_8bit(bicubic_down(x, 16), training=False), rtol=0, atol=1e-6)
    rebuilt = backbone.decode(m.upscale(y))
    torch.testing.assert_close(rebuilt, bicubic_round_trip(x, 16), rtol=0, atol=1e-5)
    # and it learns: the residual heads get gradients
    terms = m.train().training_losses(x, backbone.encode(x), get_distance("mse"))
    weighted_sum(terms, DEFAULT_STAGE1_WEIGHTS).backward()
    assert m.decoder[-1].weight.grad.abs().sum() > 0 and m.fusion[-1].weight.grad.abs().sum() > 0


def test_bicubic_skip_needs_a_pixel_layout_latent() -> None:
    with pytest.raises(ValueError, match="pixel-layout latent .*192 channels.*has 4"):
        DFRM(scale=16, latent_channels=4, bicubic_skip=True, **TINY)


def test_plain_lr_guidance_is_the_releases_non_antialiased_bicubic() -> None:
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    plain = DFRM(16, lr_guidance="plain", **TINY).lr_target(x)
    ref = torch.nn.functional.interpolate(x, size=(4, 4), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(plain, ref)
    assert torch.equal(DFRM(16, **TINY).lr_target(x), bicubic_down(x, 16))  # the default is unchanged
    assert not torch.allclose(plain, bicubic_down(x, 16), atol=1e-3)  # aliasing: another target
    with pytest.raises(ValueError, match="lr_guidance"):
        DFRM(16, lr_guidance="area", **TINY)  # type: ignore[arg-type]


def test_unscaled_latents_feed_the_raw_latent_and_scale_the_output() -> None:
    """The release's stage-2/inference convention: latent branch on z / s, G_d's output x s."""
    s = 0.18215
    scaled, raw = (
        DFRM(16, latent_scaling=s, **TINY),
        DFRM(16, latent_scaling=s, unscaled_latents=True, **TINY),
    )
    _randomise(scaled)
    raw.load_state_dict(scaled.state_dict())
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(raw.encode_lr(x, z), scaled.encode_lr(x, z / s))
        u = torch.rand(1, 3, 2, 2)
        torch.testing.assert_close(raw.decode(u), scaled.decode(u) * s)
    with pytest.raises(ValueError, match="exclude each other"):
        DFRM(16, latent_channels=192, bicubic_skip=True, unscaled_latents=True, **TINY)


def test_detail_residual_keeps_flat_colours_and_the_low_frequencies() -> None:
    """Whatever G_d learned, its filtered residual adds nothing that bicubic downscaling keeps: a flat
    LR code decodes to exactly its flat colour, and a photo's reconstruction downscales back to the
    bicubic round trip's downscale."""
    torch.manual_seed(0)
    m = DFRM(scale=16, latent_channels=192, bicubic_skip=True, detail_residual=True, **TINY).eval()
    for p in m.decoder.parameters():  # a trained, non-zero residual head
        torch.nn.init.normal_(p, std=0.5)
    flat = torch.tensor([0.8, -0.6, 0.1]).view(1, 3, 1, 1).expand(1, 3, 6, 8)
    u = m.invertible.inverse(flat)
    raw = DFRM(scale=16, latent_channels=192, bicubic_skip=True, **TINY).eval()
    raw.load_state_dict(m.state_dict())
    with torch.no_grad():
        image = lambda latent: torch.nn.functional.pixel_shuffle(latent, 8)  # noqa: E731  (unclamped)
        residual = image(m.decode(u)) - bicubic_resize(u, (96, 128))
        unfiltered = image(raw.decode(u)) - bicubic_resize(u, (96, 128))
        shift, kept = unfiltered.mean(dim=(2, 3)), residual.mean(dim=(2, 3))
        assert shift.abs().max() > 0.1  # the raw head shifts flat colours ...
        assert kept.abs().max() < 0.02 * shift.abs().max()  # ... the filtered one keeps them
        # on a photo's LR code: detail is added, with block means far below the raw head's
        lr = bicubic_down(torch.rand(1, 3, 64, 96) * 2 - 1, 16)
        base = bicubic_resize(lr, (64, 96))
        added, raw_added = image(m.decode(lr)) - base, image(raw.decode(lr)) - base
        blocks = lambda t: torch.nn.functional.avg_pool2d(t, 16).abs().mean()  # noqa: E731
        assert added.abs().mean() > 0.5 * raw_added.abs().mean()
        assert blocks(added) < 0.1 * blocks(raw_added), (blocks(added), blocks(raw_added))
    with pytest.raises(ValueError, match="needs bicubic_skip"):
        DFRM(scale=16, latent_channels=192, detail_residual=True, **TINY)
