"""Timestep aligners: fixed, TPM, oracle, spatial TPM, and third-party registration."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor

from tadm.components.aligners.fixed import FixedTimestep
from tadm.components.aligners.oracle import OracleTimestep
from tadm.components.aligners.spatial_tpm import SpatialTPM
from tadm.components.aligners.tpm import TimestepPredictionModule
from tadm.config.plugins import find_short_name
from tadm.contracts import ALIGNERS, TimestepAligner
from tadm.model.enhancer import Refiner
from tadm.ops.diffusion import noise_ratio


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def abar() -> Tensor:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod.clone()


def test_builtins_registered() -> None:
    for name, cls in [
        ("fixed", FixedTimestep),
        ("tpm", TimestepPredictionModule),
        ("oracle", OracleTimestep),
        ("spatial_tpm", SpatialTPM),
    ]:
        assert ALIGNERS.get(name) is cls
        assert find_short_name(TimestepAligner, name) == f"{cls.__module__}.{cls.__qualname__}"
    assert OracleTimestep.needs_true_latent and not TimestepPredictionModule.needs_true_latent


def test_fixed_returns_constant() -> None:
    aligner = FixedTimestep(t=37.5)
    t = aligner(torch.randn(3, 4, 8, 8).bfloat16())
    assert t.dtype == torch.float32 and t.tolist() == [37.5, 37.5, 37.5]
    assert _n_params(aligner) == 0


def test_tpm_range_shape_and_size() -> None:
    tpm = TimestepPredictionModule()
    assert abs(_n_params(tpm) - 1.2e6) / 1.2e6 < 0.05, _n_params(tpm)
    t = tpm(torch.randn(3, 4, 16, 16) * 5)
    assert t.shape == (3,) and ((t >= 10) & (t <= 200)).all()
    # extreme logits saturate at the ends of the range, never outside
    with torch.no_grad():
        tpm.head[-1].bias.fill_(1e4)
    assert torch.allclose(tpm(torch.randn(2, 4, 1, 1)), torch.tensor(200.0))


def test_tpm_learns_through_refiner_time_embedding() -> None:
    tpm = TimestepPredictionModule(t_min=10, t_max=200)
    refiner = Refiner()
    with torch.no_grad():  # the zero-initialised tail blocks every gradient upstream; open it
        refiner.tail.weight.normal_(std=0.1)
    z_hat, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    refiner(z_hat, out, tpm(z_hat)).pow(2).mean().backward()
    grads = [p.grad for p in tpm.parameters()]
    assert all(g is not None for g in grads)
    assert tpm.trunk[0][0].weight.grad.abs().sum() > 0 and tpm.head[-1].weight.grad.abs().sum() > 0


def test_oracle_matches_known_noise_level(abar: Tensor) -> None:
    oracle = OracleTimestep()
    oracle.attach_schedule(abar)
    z_true = torch.randn(3, 4, 32, 32)
    r = torch.tensor([0.01, 0.1, 1.0])
    noise = torch.randn_like(z_true)
    noise = noise / noise.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()  # unit variance exactly
    z_hat = z_true + r.sqrt().view(-1, 1, 1, 1) * noise
    t = oracle(z_hat, z_true)
    assert t.shape == (3,) and (t.diff() > 0).all()
    torch.testing.assert_close(noise_ratio(abar, t), r, rtol=1e-3, atol=0)
    # perfect reconstruction: clamped at t_min
    assert oracle(z_true, z_true).tolist() == [1.0, 1.0, 1.0]
    assert "alphas_cumprod" not in oracle.state_dict()


def test_oracle_errors_are_clear(abar: Tensor) -> None:
    oracle = OracleTimestep()
    z = torch.randn(1, 4, 4, 4)
    with pytest.raises(RuntimeError, match="attach_schedule"):
        oracle(z, z)
    oracle.attach_schedule(abar)
    with pytest.raises(ValueError, match="HR latent"):
        oracle(z)


def test_spatial_tpm_map() -> None:
    aligner = SpatialTPM(t_min=10, t_max=200)
    t = aligner(torch.randn(2, 4, 12, 10) * 5)
    assert t.shape == (2, 1, 12, 10) and ((t >= 10) & (t <= 200)).all()
    assert t.std() > 0  # a map, not a constant
    with torch.no_grad():
        aligner.head[-1].bias.fill_(-1e4)
    assert torch.allclose(aligner(torch.randn(1, 4, 5, 5)), torch.tensor(10.0))
    assert SpatialTPM(smooth_kernel=1)(torch.randn(1, 4, 3, 3)).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError, match="odd"):
        SpatialTPM(smooth_kernel=2)


def test_third_party_aligner_resolves_by_short_name() -> None:
    @ALIGNERS.register("test_const_aligner")
    class ConstAligner(TimestepAligner):
        """A test-only aligner defined outside the packages."""

        def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
            return torch.full((z_hat.shape[0],), 3.0)

    try:
        path = find_short_name(TimestepAligner, "test_const_aligner")
        assert path == f"{__name__}.test_third_party_aligner_resolves_by_short_name.<locals>.ConstAligner"
        assert ConstAligner.registry_description == "A test-only aligner defined outside the packages."
        assert ConstAligner()(torch.zeros(2, 4, 2, 2)).tolist() == [3.0, 3.0]
    finally:
        ALIGNERS.unregister("test_const_aligner")
    assert "test_const_aligner" not in ALIGNERS


def test_tpm_release_variant_keeps_names_and_changes_the_arithmetic() -> None:
    """ReLU residual blocks, torch.std (unbiased, no eps), no ReLU before the last linear."""
    from tadm.components.aligners.tpm import channel_stats

    ours = TimestepPredictionModule()
    release = TimestepPredictionModule(activation="relu", unbiased_std=True, relu_before_output=False)
    assert ours.state_dict().keys() == release.state_dict().keys()
    assert isinstance(release.head[9], torch.nn.Identity) and isinstance(
        release.trunk[1].body[1], torch.nn.ReLU
    )
    release.load_state_dict(ours.state_dict())
    z = torch.randn(2, 4, 8, 8) * 5
    assert not torch.allclose(ours(z), release(z))
    feat = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(channel_stats(feat, unbiased=True)[:, 3:], torch.std(feat, dim=[-1, -2]))
    torch.testing.assert_close(channel_stats(feat)[:, 3:], (feat.var(dim=(2, 3), correction=0) + 1e-6).sqrt())
