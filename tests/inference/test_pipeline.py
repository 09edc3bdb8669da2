"""Round-trip pipeline, padding, bicubic baseline, Y-channel metrics and stage-1 loss plumbing."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from tadm.components.aligners.fixed import FixedTimestep
from tadm.components.backbones.space_to_depth import SpaceToDepthBackbone
from tadm.components.rescalers.bicubic import Bicubic
from tadm.components.rescalers.dfrm import DFRM
from tadm.evaluation.metrics import psnr_y, rgb_to_y, ssim_y
from tadm.inference import pipeline
from tadm.model import TADMModel
from tadm.ops.images import crop_to, pad_to_multiple
from tadm.training.lightning_module import TADMModule
from tadm.training.losses import get_distance, weighted_sum


@pytest.mark.parametrize(("h", "w"), [(1, 1), (5, 3), (37, 71), (64, 64)])
def test_pad_then_crop_restores(h: int, w: int) -> None:
    x = torch.rand(2, 3, h, w)
    xp, size = pad_to_multiple(x, 16)
    assert xp.shape[-2] % 16 == 0 and xp.shape[-1] % 16 == 0
    assert size == (h, w)
    assert torch.equal(crop_to(xp, size), x)


def test_reflect_padding_mirrors_the_edge() -> None:
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 2, 5)
    xp, _ = pad_to_multiple(x, 8)
    assert xp[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]


def test_space_to_depth_is_lossless() -> None:
    b = SpaceToDepthBackbone()
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    z = b.encode(x)
    assert z.shape == (1, 192, 4, 6)
    assert torch.equal(b.decode(z), x)
    with pytest.raises(ValueError, match="multiple of 8"):
        b.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="cannot provide"):
        b.load_for_stage("enhancer")


def test_bicubic_round_trip_on_odd_size() -> None:
    b, r = SpaceToDepthBackbone(), Bicubic(16)
    x = torch.rand(1, 3, 50, 70) * 2 - 1
    rt = pipeline.round_trip(b, r, x)
    assert rt.lr.shape == (1, 3, 4, 5) and rt.reconstruction.shape == x.shape
    levels = (rt.lr + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    # a constant image survives bicubic down/up exactly (up to 8-bit rounding)
    c = torch.full((1, 3, 64, 64), 0.2)
    assert (pipeline.round_trip(b, r, c).reconstruction - c).abs().max() < 1 / 127.5


def test_metrics_identical_images_and_torchmetrics_agreement() -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isinf(psnr_y(x, x)).all()
    assert torch.allclose(ssim_y(x, x), torch.ones(2))
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    ours = psnr_y(y, x)
    q = lambda t: ((t + 1) / 2 * 255).round() / 255  # noqa: E731
    ref = torch.stack(
        [
            peak_signal_noise_ratio(rgb_to_y(q(y[i : i + 1])), rgb_to_y(q(x[i : i + 1])), data_range=1.0)
            for i in range(2)
        ]
    )
    torch.testing.assert_close(ours, ref)
    assert (ours > 15).all() and (ours < 40).all()


def test_rgb_to_y_bt601_range() -> None:
    black, white = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    assert rgb_to_y(black).item() == pytest.approx(16 / 255)
    assert rgb_to_y(white).item() == pytest.approx(235 / 255, abs=1e-5)


def test_l1_option_and_unweighted_term_is_an_error() -> None:
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    assert get_distance("l1")(a, b).item() == 2.0
    assert get_distance("mse")(a, b).item() == 4.0
    with pytest.raises(ValueError, match="unknown distance"):
        get_distance("huber")
    with pytest.raises(KeyError, match=r"\['extra'\] have no weight"):
        weighted_sum({"lr": a.sum(), "extra": a.sum()}, {"lr": 1.0})


def test_module_rejects_mismatches_and_unknown_stages() -> None:
    tiny = dict(width=8, num_resblocks=1, pixel_width=4, num_couplings=1, coupling_growth=4)
    for cls in (TADMModel, TADMModule):  # the plain model checks; the training module inherits its checks
        with pytest.raises(ValueError, match="expects 4 latent channels .* produces 192"):
            cls(SpaceToDepthBackbone(), DFRM(16, latent_channels=4, **tiny))
        with pytest.raises(ValueError, match="rescaler scale 32 differs"):
            cls(SpaceToDepthBackbone(), Bicubic(32), scale=16)
        with pytest.raises(ValueError, match="needs model.aligner"):
            cls(SpaceToDepthBackbone(), Bicubic(16), stage="enhancer")
        with pytest.raises(ValueError, match="unknown stage"):
            cls(SpaceToDepthBackbone(), Bicubic(16), stage="stage4")  # type: ignore[arg-type]
    model = TADMModel(SpaceToDepthBackbone(), Bicubic(16), stage="enhancer", aligner=FixedTimestep())
    with pytest.raises(ValueError, match="cannot provide"):  # no UNet in a weight-free autoencoder
        model.load_parts()
    module = TADMModule(SpaceToDepthBackbone(), Bicubic(16), stage="enhancer", aligner=FixedTimestep())
    with pytest.raises(ValueError, match="cannot provide"):  # when a trainer configures it
        module.configure_model()


def test_module_evaluation_logs_baseline_and_lr_fidelity() -> None:
    m = TADMModule(SpaceToDepthBackbone(), Bicubic(16)).eval()
    m.configure_model()
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    out = m.evaluate_batch(x)
    # the bicubic rescaler IS the baseline: identical metrics, and its LR equals the bicubic LR
    torch.testing.assert_close(out["psnr_y"], out["bicubic_psnr_y"])
    assert out["lr_psnr"].item() > 45  # only 8-bit rounding separates them
    assert out["_reconstruction"].shape == x.shape
