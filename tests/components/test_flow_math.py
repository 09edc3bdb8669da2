"""Rectified-flow one-step math and time conventions: diffusers agreement, shifts, reference mapping."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from tadm.ops.diffusion import (
    DDPMTime,
    FlowTime,
    abar_at,
    dynamic_shift_mu,
    flow_noise_ratio,
    flow_x0,
    noise_ratio,
    reference_alphas_cumprod,
    scheduler_shift,
    shift_sigma,
    x0_from_output,
)

#: the scheduler configs the real folders ship (SD 3.5: static shift 3; FLUX.1-dev: dynamic; schnell: none)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _one_step(sched: FlowMatchEulerDiscreteScheduler, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """diffusers' Euler step from the scheduler's first sigma to the appended terminal sigma 0."""
    return sched.step(v, sched.timesteps[0], z).prev_sample


@pytest.mark.parametrize("sigma", [0.02, 0.184, 0.5, 0.95])
def test_flow_x0_equals_the_euler_step_to_zero(sigma: float) -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(sigmas=[sigma])
    z, v = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    expected = _one_step(sched, v, z)
    t = sched.timesteps[0]  # what the pipelines feed the transformer: sigma * 1000
    torch.testing.assert_close(t, torch.tensor(sigma * 1000), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(flow_x0(z, v, sigma), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        FlowTime().x0(z, v, torch.full((2,), float(t))), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("config", "seq_len"), [(SD3_SCHEDULER, 1024), (FLUX_DEV_SCHEDULER, 1024), (FLUX_DEV_SCHEDULER, 4096)]
)
def test_shifted_schedules_keep_t_equal_to_sigma_times_1000(config: dict, seq_len: int) -> None:
    """The shift moves the sigmas a schedule visits; the transformer's t stays sigma * 1000, so the x0 of the
    convention at the scheduler's timestep equals its step, and our shift reproduces its sigma."""
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len) if config.get("use_dynamic_shifting") else None
    for u in (0.05, 0.3, 0.8):
        sched.set_timesteps(sigmas=[u], mu=mu)
        z, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
        expected = _one_step(sched, v, z)
        torch.testing.assert_close(FlowTime().x0(z, v, sched.timesteps[:1]), expected, rtol=1e-5, atol=1e-5)
        shifted = shift_sigma(torch.tensor(u), scheduler_shift(config, seq_len))
        torch.testing.assert_close(shifted, sched.sigmas[0], rtol=1e-5, atol=1e-6)


def test_static_shift_matches_the_training_sigmas() -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(shift_sigma(u, 3.0), sched.sigmas, rtol=1e-5, atol=1e-6)
    assert shift_sigma(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_dynamic_mu_is_fluxs_calculate_shift(seq_len: int) -> None:
    assert dynamic_shift_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert scheduler_shift(FLUX_DEV_SCHEDULER, seq_len) == pytest.approx(math.exp(calculate_shift(seq_len)))
    assert scheduler_shift({"shift": 1.0}, seq_len) == 1.0  # schnell: no shift


def test_flow_x0_accepts_a_sigma_map_and_is_differentiable_in_t() -> None:
    z, v = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    t = torch.full((2, 1, 6, 6), 100.0)
    t[..., :3] = 400.0
    t.requires_grad_(True)
    got = FlowTime().x0(z, v, t)
    torch.testing.assert_close(got[..., :3], (z - 0.4 * v)[..., :3])
    torch.testing.assert_close(got[..., 3:], (z - 0.1 * v)[..., 3:])
    got.sum().backward()
    torch.testing.assert_close(t.grad[:, 0], -v.sum(dim=1) / 1000)  # d(x0)/dt = -v / T
    with pytest.raises(ValueError, match="equal shape"):
        flow_x0(z, v[:, :4], 0.5)


def test_reference_schedule_is_sds() -> None:
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.equal(reference_alphas_cumprod(), ref)


def test_ddpm_convention_is_the_ddpm_formulas_bit_for_bit() -> None:
    abar = reference_alphas_cumprod()
    time = DDPMTime(abar, "v_prediction")
    z, out, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([30.5, 150.0])
    assert torch.equal(time.x0(z, out, t), x0_from_output(z, out, abar_at(abar, t), "v_prediction"))
    for value in (0.0, 10.0, 50.0, 200.0, 999.0):  # the identity: TADM's numbers are SD's own
        assert time.from_reference(value) == value
    assert DDPMTime(abar[::2].clone()).from_reference(200.0) == 100.0  # a 500-step schedule: same fraction
    torch.testing.assert_close(time.t_for_noise_ratio(time.noise_ratio(t)), t, rtol=1e-4, atol=1e-3)


def test_flow_reference_map_matches_the_noise_level() -> None:
    """noise_level: a reference t maps to the sigma whose noise-to-signal ratio is the reference's."""
    time = FlowTime()
    abar = reference_alphas_cumprod().double()
    mapped = {t: time.from_reference(t) for t in (10.0, 50.0, 200.0)}
    for t, t_flow in mapped.items():
        torch.testing.assert_close(time.noise_ratio(t_flow).double(), noise_ratio(abar, t), rtol=1e-5, atol=0)
    assert mapped[10.0] == pytest.approx(89.5, abs=0.1) and mapped[200.0] == pytest.approx(363.7, abs=0.1)
    assert mapped[50.0] == pytest.approx(184.1, abs=0.1)
    # fraction: the same fraction of the shifted training schedule
    frac = FlowTime(shift=3.0, reference="fraction")
    assert frac.from_reference(200.0) == pytest.approx(1000 * 0.6 / 1.4)
    assert FlowTime(reference="fraction").from_reference(200.0) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="unknown reference map"):
        FlowTime(reference="sigma")  # type: ignore[arg-type]


def test_flow_noise_ratio_inverts() -> None:
    time = FlowTime()
    r = torch.tensor([0.0, 0.01, 0.1, 1.0, 4.0])
    t = time.t_for_noise_ratio(r)
    torch.testing.assert_close(time.noise_ratio(t), r, rtol=1e-5, atol=1e-7)
    assert t.dtype == torch.float32 and t[3].item() == pytest.approx(500.0)  # ratio 1: sigma 1/2
    assert time.t_for_noise_ratio(r, t_min=50.0, t_max=600.0).tolist()[0] == 50.0
    torch.testing.assert_close(flow_noise_ratio(torch.tensor(0.5)), torch.tensor(1.0))


# ------------------------------------------------------------------------ aligners and the enhancer
def test_aligner_ranges_follow_the_backbone_convention() -> None:
    from tadm.components.aligners.fixed import FixedTimestep
    from tadm.components.aligners.oracle import OracleTimestep
    from tadm.components.aligners.spatial_tpm import SpatialTPM
    from tadm.components.aligners.tpm import TimestepPredictionModule

    flow, ddpm = FlowTime(), DDPMTime(reference_alphas_cumprod(), "epsilon")
    tpm = TimestepPredictionModule(latent_channels=16)
    tpm.attach_time(ddpm)
    assert (tpm.t_min, tpm.t_max) == (10.0, 200.0)  # SD: untouched
    tpm.attach_time(flow)  # re-attaching maps the configured values again, not the mapped ones
    assert (tpm.t_min, tpm.t_max) == (flow.from_reference(10.0), flow.from_reference(200.0))
    t = tpm(torch.randn(3, 16, 8, 8))
    assert ((t >= tpm.t_min) & (t <= tpm.t_max)).all() and tpm.t_max == pytest.approx(363.7, abs=0.1)
    spatial = SpatialTPM(latent_channels=16)
    spatial.attach_time(flow)
    assert spatial.t_min == tpm.t_min and spatial.t_max == tpm.t_max
    fixed = FixedTimestep(t=50.0)
    fixed.attach_time(flow)
    assert fixed(torch.randn(2, 16, 4, 4)).tolist() == pytest.approx([flow.from_reference(50.0)] * 2)
    # the oracle reads the error of z_hat as a flow noise level: (sigma / (1 - sigma))^2 = mse
    oracle = OracleTimestep()
    oracle.attach_time(flow)
    z_true = torch.randn(2, 16, 16, 16)
    noise = torch.randn_like(z_true)
    noise = noise / noise.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    r = torch.tensor([0.05, 0.2])
    t = oracle(z_true + r.sqrt().view(-1, 1, 1, 1) * noise, z_true)
    torch.testing.assert_close(flow.noise_ratio(t), r, rtol=1e-4, atol=0)
    assert oracle(z_true, z_true).tolist() == pytest.approx([flow.from_reference(1.0)] * 2)


def test_hybrid_scheduler_in_flow_time() -> None:
    """Fixed branch at t0 = 50 mapped to flow time: x0 = z - sigma(t0) v; learned_t uses the map."""
    from tadm.model.enhancer import HybridScheduler

    flow = FlowTime()
    z, v = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    t = torch.tensor([120.0, 300.0])
    sigma0 = flow.from_reference(50.0) / 1000
    fixed = HybridScheduler(latent_channels=16)(z, v, t, flow)
    torch.testing.assert_close(fixed, z - sigma0 * v)  # the Refiner is zero at init
    learned = HybridScheduler(mode="learned_t", latent_channels=16)(z, v, t, flow)
    torch.testing.assert_close(learned, z - (t / 1000).view(-1, 1, 1, 1) * v)
    # the Refiner's time embedding tells flow-range timesteps apart
    sched = HybridScheduler(latent_channels=16)
    with torch.no_grad():
        sched.refiner.tail.weight.normal_(std=0.1)
    low, high = sched(z, v, torch.tensor([90.0, 90.0]), flow), sched(z, v, torch.tensor([360.0, 360.0]), flow)
    assert (low - high).abs().max() > 1e-4
