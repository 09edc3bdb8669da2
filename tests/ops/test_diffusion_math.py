"""Continuous-timestep schedule math: diffusers agreement, interpolation, ratio inversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from tadm.ops.diffusion import abar_at, noise_ratio, t_for_noise_ratio, x0_from_output


def _sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    # clip_sample/thresholding off: pred_original_sample is then the plain one-step formula
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=False,
    )


@pytest.fixture
def abar() -> torch.Tensor:
    return _sd_scheduler().alphas_cumprod.clone()


@pytest.mark.parametrize(
    ("ours", "theirs"), [("epsilon", "epsilon"), ("eps", "epsilon"), ("v", "v_prediction")]
)
def test_x0_matches_diffusers_ddpm(ours: str, theirs: str) -> None:
    sched = _sd_scheduler(theirs)
    z = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    for t in (0, 1, 50, 200, 999):
        expected = sched.step(out, t, z).pred_original_sample
        got = x0_from_output(z, out, abar_at(sched.alphas_cumprod, torch.full((2,), float(t))), ours)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_x0_sample_and_unknown_type() -> None:
    z, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert x0_from_output(z, out, torch.tensor([0.5]), "sample") is out
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        x0_from_output(z, out, torch.tensor([0.5]), "flow")


def test_x0_accepts_abar_map_and_rejects_wrong_size(abar: torch.Tensor) -> None:
    z, out = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    t_map = torch.full((2, 1, 6, 6), 50.0)
    t_map[:, :, :3] = 200.0
    got = x0_from_output(z, out, abar_at(abar, t_map), "epsilon")
    top = x0_from_output(z, out, abar_at(abar, torch.full((2,), 200.0)), "epsilon")
    bottom = x0_from_output(z, out, abar_at(abar, torch.full((2,), 50.0)), "epsilon")
    torch.testing.assert_close(got[:, :, :3], top[:, :, :3])
    torch.testing.assert_close(got[:, :, 3:], bottom[:, :, 3:])
    with pytest.raises(ValueError, match="latent's batch and size"):
        x0_from_output(z, out, torch.full((2, 1, 3, 3), 0.9), "epsilon")
    with pytest.raises(ValueError, match="latent batch is 2"):
        x0_from_output(z, out, torch.full((3,), 0.9), "epsilon")


def test_abar_exact_at_integers_and_between_neighbours(abar: torch.Tensor) -> None:
    t = torch.tensor([0.0, 1.0, 50.0, 500.0, 999.0])
    assert torch.equal(abar_at(abar, t), abar[t.long()])
    assert abar_at(abar, torch.tensor(50.0)).item() == pytest.approx(0.9516, abs=1e-4)
    mid = abar_at(abar, torch.tensor([50.25, 300.5]))
    torch.testing.assert_close(
        mid, torch.stack([0.75 * abar[50] + 0.25 * abar[51], (abar[300] + abar[301]) / 2])
    )
    assert abar[51] < mid[0] < abar[50]
    # clamped outside [0, T-1]; shape preserved for maps
    assert abar_at(abar, torch.tensor([-5.0, 2000.0])).tolist() == [abar[0].item(), abar[999].item()]
    assert abar_at(abar, torch.full((2, 1, 3, 5), 7.5)).shape == (2, 1, 3, 5)


def test_abar_differentiable_in_t(abar: torch.Tensor) -> None:
    t = torch.tensor([50.3, 120.7], requires_grad=True)
    abar_at(abar, t).sum().backward()
    torch.testing.assert_close(t.grad, torch.stack([abar[51] - abar[50], abar[121] - abar[120]]))
    assert (t.grad < 0).all()


def test_t_for_noise_ratio_round_trip(abar: torch.Tensor) -> None:
    ratio = torch.tensor([1e-3, 0.01, 0.0508, 0.5, 3.0, 50.0])
    t = t_for_noise_ratio(abar, ratio)
    assert (t > 0).all() and (t < 999).all() and (t.diff() > 0).all()
    torch.testing.assert_close(noise_ratio(abar, t), ratio, rtol=1e-3, atol=0)
    # an integer t maps back to itself
    r50 = (1 - abar[50]) / abar[50]
    assert t_for_noise_ratio(abar, r50).item() == pytest.approx(50.0, abs=1e-3)


def test_t_for_noise_ratio_clamps(abar: torch.Tensor) -> None:
    t = t_for_noise_ratio(abar, torch.tensor([0.0, 1e-9, 1e6]), t_min=1.0, t_max=900.0)
    assert t.tolist() == [1.0, 1.0, 900.0]
    assert t_for_noise_ratio(abar, torch.tensor([1e6])).item() == 999.0
