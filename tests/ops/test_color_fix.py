"""Colour correction (``--color-fix none|wavelet|adain``): the math on real photos, the options and the report."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.evaluation.report import CSV_COLUMNS, EvalReport, ImageRow
from tadm.inference.pipeline import bicubic_round_trip, color_reference
from tadm.ops.color_fix import (
    COLOR_FIXES,
    adain_color_fix,
    apply_color_fix,
    wavelet_color_fix,
    wavelet_low_pass,
)
from tests.helpers import SAMPLES

SHIFT = torch.tensor([0.15, -0.12, 0.08]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photo() -> Tensor:
    from tadm.datamodules.image_io import load_image

    img = load_image(SAMPLES / "train" / "astronaut.png")
    return F.interpolate(img[None], size=(200, 296), mode="area")  # not a multiple of the scale


@pytest.fixture(scope="module")
def reference(photo: Tensor) -> Tensor:
    """What the codec matches: the bicubic upscale of the photo's 8-bit LR image (blurry, true colours)."""
    return bicubic_round_trip(photo, 8)


def _shifted(photo: Tensor) -> Tensor:
    """A reconstruction with the photo's details and wrong colours (kept inside [-1, 1])."""
    return (photo * 0.8 + SHIFT).clamp(-1, 1)


def _high_pass(x: Tensor) -> Tensor:
    """The finest details: the image minus its 3x3 binomial blur."""
    return x - wavelet_low_pass(x, levels=1)


def _colour_error(x: Tensor, ref: Tensor) -> float:
    return float((x.mean(dim=(-2, -1)) - ref.mean(dim=(-2, -1))).abs().max())


def test_none_is_the_identity(photo: Tensor, reference: Tensor) -> None:
    out = _shifted(photo)
    assert apply_color_fix(out, reference, "none") is out


def test_adain_gives_each_channel_the_references_mean_and_std(photo: Tensor, reference: Tensor) -> None:
    out = _shifted(photo)
    fixed = apply_color_fix(out, reference, "adain")
    assert fixed.dtype == torch.float32 and fixed.shape == out.shape
    std_f, mean_f = torch.std_mean(fixed, dim=(-2, -1), correction=0)
    std_r, mean_r = torch.std_mean(reference, dim=(-2, -1), correction=0)
    std_o, mean_o = torch.std_mean(out, dim=(-2, -1), correction=0)
    assert (mean_o - mean_r).abs().max() > 0.05 and (std_o - std_r).abs().max() > 0.02  # it had to change
    torch.testing.assert_close(mean_f, mean_r, atol=2e-4, rtol=0)
    torch.testing.assert_close(std_f, std_r, atol=2e-4, rtol=0)
    # per channel an affine map of the output: its details stay (correlation 1)
    for c in range(3):
        a, b = out[0, c].flatten(), fixed[0, c].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


def test_adain_leaves_a_flat_channel_flat_and_shifts_it() -> None:
    out = torch.zeros(1, 3, 16, 16)
    ref = torch.rand(1, 3, 16, 16) * 0.2
    fixed = adain_color_fix(out, ref)
    assert torch.isfinite(fixed).all() and fixed.std(dim=(-2, -1)).max() < 1e-6
    torch.testing.assert_close(fixed.mean(dim=(-2, -1)), ref.mean(dim=(-2, -1)), atol=1e-6, rtol=0)


def test_wavelet_keeps_the_outputs_details_and_takes_the_references_colours(
    photo: Tensor, reference: Tensor
) -> None:
    out = _shifted(photo)
    fixed = apply_color_fix(out, reference, "wavelet")
    assert fixed.dtype == torch.float32 and fixed.shape == out.shape
    # colour: the shift is gone (mean colour error from ~0.15 to near zero)
    before, after = _colour_error(out, reference), _colour_error(fixed, reference)
    assert before > 0.1 and after < 0.01, (before, after)
    # low frequencies are the reference's: a wide blur of the result is the reference's
    blur = torch.nn.AvgPool2d(33, stride=1, padding=16, count_include_pad=False)
    err_before = (blur(out) - blur(reference)).abs().mean()
    err_after = (blur(fixed) - blur(reference)).abs().mean()
    assert err_after < err_before / 5, (err_before.item(), err_after.item())
    # high frequencies are the output's, not the (blurry) reference's
    hp_out, hp_fixed, hp_ref = _high_pass(out), _high_pass(fixed), _high_pass(reference)
    kept = (hp_fixed - hp_out).abs().mean() / hp_out.abs().mean()
    assert kept < 0.03, kept.item()
    assert (hp_fixed - hp_ref).abs().mean() > 0.5 * (hp_out - hp_ref).abs().mean()


def test_wavelet_is_stablesrs_decomposition(photo: Tensor, reference: Tensor) -> None:
    """x + low(ref - x) equals StableSR's high(x) + low(ref), with high accumulated level by level."""

    def decompose(x: Tensor) -> tuple[Tensor, Tensor]:
        high = torch.zeros_like(x)
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        for i in range(5):
            r = 2**i
            low = F.conv2d(
                F.pad(x, (r,) * 4, mode="replicate"), kernel.expand(3, 1, 3, 3), dilation=r, groups=3
            )
            high = high + (x - low)
            x = low
        return high, x

    out = _shifted(photo)
    expected = (decompose(out)[0] + decompose(reference)[1]).clamp(-1, 1)
    torch.testing.assert_close(wavelet_color_fix(out, reference), expected, atol=1e-5, rtol=0)


def test_fixes_run_in_float32_on_half_inputs_and_small_images(photo: Tensor, reference: Tensor) -> None:
    out = _shifted(photo).bfloat16()
    for method in ("wavelet", "adain"):
        fixed = apply_color_fix(out, reference, method)
        assert fixed.dtype == torch.float32 and fixed.abs().max() <= 1
        assert _colour_error(fixed, reference) < 0.01
    tiny = torch.rand(1, 3, 3, 5) * 2 - 1  # smaller than the blur radius: replicate padding copes
    assert apply_color_fix(tiny, tiny, "wavelet").shape == tiny.shape
    torch.testing.assert_close(apply_color_fix(tiny, tiny, "wavelet"), tiny, atol=1e-6, rtol=0)


def test_bad_names_and_shapes_are_errors(photo: Tensor) -> None:
    with pytest.raises(ValueError, match="unknown colour fix 'histogram'"):
        apply_color_fix(photo, photo, "histogram")
    with pytest.raises(ValueError, match="shape"):
        apply_color_fix(photo, photo[..., :-1], "wavelet")


def test_the_reference_is_the_bicubic_upscale_of_the_lr_image(photo: Tensor, reference: Tensor) -> None:
    from tadm.contracts import quantize_8bit
    from tadm.ops.images import bicubic_down, pad_to_multiple

    xp, size = pad_to_multiple(photo, 8)
    y = quantize_8bit(bicubic_down(xp, 8), training=False)
    torch.testing.assert_close(color_reference(y, 8, size), reference)


def test_the_option_reaches_the_codec_and_bad_values_are_argparse_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tadm.model.loading
    from tadm.commands.common import add_color_fix_argument, add_model_arguments, load_from_args
    from tadm.commands.main import main

    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    add_color_fix_argument(ap)
    monkeypatch.setattr(tadm.model.loading, "load_codec", lambda ckpt, **kw: kw)
    assert load_from_args(ap.parse_args(["--ckpt", "c"]))["color_fix"] == "none"  # type: ignore[index]
    for method in COLOR_FIXES:
        kw = load_from_args(ap.parse_args(["--ckpt", "c", "--color-fix", method]))
        assert kw["color_fix"] == method  # type: ignore[index]
    for command in ("upscale", "evaluate"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--ckpt", "c", "in", "--output", "out", "--color-fix", "histogram"])
        assert exc.value.code == 2 and "--color-fix: invalid choice: 'histogram'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # downscale makes no HR image: no such option
        main(["downscale", "--ckpt", "c", "in", "--output", "out", "--color-fix", "wavelet"])


def test_the_evaluate_report_records_the_colour_fix(tmp_path: Path) -> None:
    row = ImageRow("a.png", 8, 8, "m", 30.0, 0.9, None, None, 0.1)
    default = EvalReport(methods=["m"], rows=[row])
    assert (
        default.markdown().splitlines()[1] == "Colour correction: `none` (`tadm evaluate --color-fix none`)"
    )
    report = EvalReport(methods=["m"], rows=[row], color_fix="wavelet")
    text = report.write(tmp_path)
    assert text.splitlines()[1] == "Colour correction: `wavelet` (`tadm evaluate --color-fix wavelet`)"
    assert "Colour correction `wavelet`: each reconstruction has its low frequencies" in text
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert list(rows[0]) == list(CSV_COLUMNS) and rows[0]["color_fix"] == "wavelet"
    assert json.loads((tmp_path / "summary.json").read_text())["color_fix"] == "wavelet"
