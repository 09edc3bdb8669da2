"""Hybrid time scheduler and Refiner: init equals the fixed branch, modes, time conditioning."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor

from tadm.model.enhancer import HybridScheduler, Refiner, unet_timestep
from tadm.ops.diffusion import abar_at, x0_from_output


@pytest.fixture
def abar() -> Tensor:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod.clone()


def _inputs(b: int = 2, h: int = 8, w: int = 8) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 4, h, w), torch.randn(b, 4, h, w)


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_refiner_size_and_zero_init() -> None:
    refiner = Refiner()
    n = sum(p.numel() for p in refiner.parameters())
    assert abs(n - 0.46e6) / 0.46e6 < 0.10, n
    z, out = _inputs()
    assert torch.equal(refiner(z, out, torch.tensor([30.0, 150.0])), torch.zeros_like(z))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spatial", [False, True])
def test_hybrid_at_init_equals_fixed_branch(abar: Tensor, prediction_type: str, spatial: bool) -> None:
    sched = HybridScheduler(t0=50.0)
    z, out = _inputs()
    t = torch.rand(2, 1, 8, 8) * 190 + 10 if spatial else torch.tensor([30.0, 150.0])
    fixed = x0_from_output(z, out, abar_at(abar, torch.tensor(50.0)), prediction_type)
    assert torch.equal(sched(z, out, t, abar, prediction_type), fixed)
    # the fixed branch really is the constant-t0 one-step estimate
    sa, s1 = abar[50].sqrt(), (1 - abar[50]).sqrt()
    expected = (z - s1 * out) / sa if prediction_type == "epsilon" else sa * z - s1 * out
    torch.testing.assert_close(fixed, expected)


def test_fixed_only_ignores_refiner(abar: Tensor) -> None:
    sched = HybridScheduler(mode="fixed_only")
    _perturb(sched.refiner)
    z, out = _inputs()
    got = sched(z, out, torch.tensor([30.0, 150.0]), abar, "epsilon")
    assert torch.equal(got, x0_from_output(z, out, abar[50], "epsilon"))
    assert sched.trainable_parameters() == []
    assert not any(p.requires_grad for p in sched.refiner.parameters())
    assert len(HybridScheduler().trainable_parameters()) == len(list(Refiner().parameters()))


def test_learned_t_uses_abar_of_t(abar: Tensor) -> None:
    sched = HybridScheduler(mode="learned_t")
    z, out = _inputs()
    t = torch.tensor([30.0, 150.0])
    expected = x0_from_output(z, out, abar_at(abar, t), "epsilon")
    assert torch.equal(sched(z, out, t, abar, "epsilon"), expected)
    assert not torch.allclose(expected, x0_from_output(z, out, abar[50], "epsilon"))
    t_map = torch.full((2, 1, 8, 8), 150.0)
    t_map[..., :4] = 30.0
    got = sched(z, out, t_map, abar, "v_prediction")
    torch.testing.assert_close(got[..., :4], x0_from_output(z, out, abar[30], "v_prediction")[..., :4])
    torch.testing.assert_close(got[..., 4:], x0_from_output(z, out, abar[150], "v_prediction")[..., 4:])


def test_hybrid_after_training_adds_refiner(abar: Tensor) -> None:
    sched = HybridScheduler()
    _perturb(sched.refiner.tail)
    z, out = _inputs()
    t = torch.tensor([30.0, 150.0])
    fixed = x0_from_output(z, out, abar[50], "epsilon")
    torch.testing.assert_close(sched(z, out, t, abar, "epsilon"), fixed + sched.refiner(z, out, t))


def test_refiner_depends_on_t_and_on_the_map() -> None:
    refiner = Refiner()
    _perturb(refiner.tail)
    z, out = _inputs(1)
    low, high = refiner(z, out, torch.tensor([20.0])), refiner(z, out, torch.tensor([180.0]))
    assert (low - high).abs().max() > 1e-4
    # a constant map equals the scalar t; a split map gives each half its own t's output (near the split,
    # the 3x3 convs mix both, so compare away from it)
    const = refiner(z, out, torch.full((1, 1, 8, 8), 20.0))
    torch.testing.assert_close(const, low)
    t_map = torch.full((1, 1, 8, 8), 20.0)
    t_map[..., 4:] = 180.0
    split = refiner(z, out, t_map)
    assert (split[..., 4:] - low[..., 4:]).abs().max() > 1e-4
    assert (split[..., :4] - high[..., :4]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="latent size"):
        refiner(z, out, torch.full((1, 1, 4, 4), 20.0))


def test_refiner_tail_gets_gradient_at_init() -> None:
    refiner = Refiner()
    z, out = _inputs()
    refiner(z, out, torch.tensor([30.0, 150.0])).sum().backward()
    assert refiner.tail.weight.grad.abs().sum() > 0  # training can leave the zero init


def test_unet_timestep() -> None:
    t = torch.tensor([5.0, 7.0])
    assert unet_timestep(t) is t
    t_map = torch.stack([torch.full((1, 4, 4), 10.0), torch.arange(16.0).view(1, 4, 4)])
    assert unet_timestep(t_map).tolist() == [10.0, 7.5]
    with pytest.raises(ValueError, match=r"\(B,\) or a \(B,1,h,w\)"):
        unet_timestep(torch.zeros(2, 3))


def test_bad_mode_rejected() -> None:
    with pytest.raises(ValueError, match="unknown HybridScheduler mode 'both'"):
        HybridScheduler(mode="both")  # type: ignore[arg-type]


def test_refiner_release_variant_keeps_names_and_follows_the_release() -> None:
    """ReLU blocks, sin-first features with frequency shift 1, LeakyReLU(0.1) after the zero conv."""
    ours = Refiner()
    release = Refiner(activation="relu", flip_sin_to_cos=False, freq_shift=1.0, tail_activation=True)
    assert ours.state_dict().keys() == release.state_dict().keys()
    z, out = _inputs()
    t = torch.tensor([10.0, 150.0])
    assert torch.equal(release(z, out, t), torch.zeros_like(z))  # still zero at init
    assert (
        isinstance(release.blocks[0].body[1], torch.nn.ReLU)
        and release.blocks[0].body[0].bias.abs().max() == 0
    )
    half = 32
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1))
    torch.testing.assert_close(
        release.time_proj(t), torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], 1)
    )
    _perturb(release)
    plain = Refiner(activation="relu", flip_sin_to_cos=False, freq_shift=1.0)
    plain.load_state_dict(release.state_dict())
    with torch.no_grad():
        a, b = release(z, out, t), plain(z, out, t)
    assert (b < 0).any()
    torch.testing.assert_close(a, torch.where(b < 0, 0.1 * b, b))
    scheduler = HybridScheduler(
        refiner_activation="relu",
        refiner_flip_sin_to_cos=False,
        refiner_freq_shift=1.0,
        refiner_tail_activation=True,
    )
    assert scheduler.refiner.tail_activation and not scheduler.refiner.time_proj.flip_sin_to_cos
