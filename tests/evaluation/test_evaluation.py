"""``tadm evaluate`` engine: input iteration (files, folders, globs, shards, bad files), metric values against
independent references, the protocol in every report file, report files parsed back, and FID / KID equal to
torchmetrics' or reported n/a (with the reason) when unavailable."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import statistics
import tarfile
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from tadm.datamodules.image_io import load_image
from tadm.datamodules.inputs import BadImage, EvalImage, iter_hr_images
from tadm.datamodules.shard_writer import pack_shards
from tadm.errors import InputError
from tadm.evaluation import engine, fid, scoring
from tadm.evaluation.engine import evaluate
from tadm.evaluation.fid import FID_WEIGHTS_FILE
from tadm.evaluation.protocols import get_protocol
from tadm.evaluation.report import CSV_COLUMNS, EvalReport
from tadm.evaluation.scoring import Metrics, MetricUnavailableWarning


def _image(seed: int, h: int = 32, w: int = 40) -> Tensor:
    """A smooth random (3,H,W) image in [-1, 1] (some structure, so SSIM/LPIPS have something to see)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 4, w // 4, generator=g)
    return (F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] * 2 - 1).clamp(-1, 1)


def _png_bytes(x: Tensor) -> bytes:
    arr = ((x.permute(1, 2, 0).numpy() + 1) / 2 * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(_image(seed)))
    return path


def _noise(std: float, seed: int = 1) -> Callable[[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lambda x: (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _identity(x: Tensor) -> Tensor:
    return x


@pytest.fixture(scope="module")
def perceptual(one_thread: None) -> Metrics:
    """Built once: two random VGGs take seconds."""
    return Metrics(fid=False)


@pytest.fixture(scope="module")
def scored(perceptual: Metrics) -> EvalReport:
    images = [EvalImage(f"img{i}.png", _image(i)) for i in range(3)]
    methods = {"identity": _identity, "light": _noise(0.05), "heavy": _noise(0.3)}
    return evaluate(images, methods, perceptual)


def _plain() -> Metrics:
    return Metrics(perceptual=False, fid=False)


# ---------------------------------------------------------------------------------------------- metric values


def test_identical_images_give_perfect_scores(perceptual: Metrics) -> None:
    x = _image(0)[None]
    v = perceptual.image(x, x.clone())
    assert v["psnr_y"] == math.inf
    assert v["ssim_y"] == pytest.approx(1.0, abs=1e-5)
    assert v["lpips"] is not None and abs(v["lpips"]) < 1e-5
    assert v["dists"] is not None and abs(v["dists"]) < 1e-5


def test_tiny_images_get_psnr_ssim_and_no_perceptual_scores(perceptual: Metrics) -> None:
    """1x1 .. 31 px images: SSIM with a shrunk window, LPIPS/DISTS undefined (VGG pooling) and said so."""
    for h, w in ((1, 1), (5, 3), (20, 31)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 2 - 1
        v = perceptual.image(x, x.clone())
        assert v["psnr_y"] == math.inf and v["ssim_y"] == pytest.approx(1.0, abs=1e-5)
        assert v["lpips"] is None and v["dists"] is None
        noisy = perceptual.image(_noise(0.3)(x), x)
        assert noisy["ssim_y"] is not None and noisy["ssim_y"] < 1.0
    assert any("under 32 px" in c for c in perceptual.caveats)


def _reference_y(x: Tensor) -> Tensor:
    """Independent Y (BT.601) of an 8-bit-rounded image in [-1, 1]."""
    u = ((x.clamp(-1, 1) + 1) / 2 * 255).round() / 255
    return ((65.481 * u[:, 0] + 128.553 * u[:, 1] + 24.966 * u[:, 2]) / 255 + 16 / 255)[:, None]


def test_psnr_ssim_equal_torchmetrics_reference() -> None:
    target, pred = _image(3)[None], _noise(0.1)(_image(3)[None])
    v = _plain().image(pred, target)
    ref_psnr = PeakSignalNoiseRatio(data_range=1.0)(_reference_y(pred), _reference_y(target))
    ref_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(_reference_y(pred), _reference_y(target))
    assert v["psnr_y"] == pytest.approx(float(ref_psnr), abs=1e-4)
    assert v["ssim_y"] == pytest.approx(float(ref_ssim), abs=1e-5)
    assert v["lpips"] is None and v["dists"] is None
    # flat grey 128 vs 136: Y differs by 8 * 219 / 255 levels of 255 -> PSNR = 20 log10(255^2 / (8 * 219))
    grey = torch.full((1, 3, 16, 16), 128 / 255 * 2 - 1)
    lighter = torch.full((1, 3, 16, 16), 136 / 255 * 2 - 1)
    assert _plain().image(lighter, grey)["psnr_y"] == pytest.approx(
        20 * math.log10(255**2 / (8 * 219)), abs=1e-3
    )


def test_identity_beats_noise_on_every_metric(scored: EvalReport) -> None:
    by = {(r.path, r.method): r for r in scored.rows}
    for i in range(3):
        ident, light, heavy = (by[(f"img{i}.png", m)] for m in ("identity", "light", "heavy"))
        assert ident.psnr_y == math.inf > light.psnr_y > heavy.psnr_y
        assert ident.ssim_y > light.ssim_y > heavy.ssim_y
        assert ident.lpips < light.lpips < heavy.lpips  # type: ignore[operator]
        assert ident.dists < light.dists < heavy.dists  # type: ignore[operator]
        assert (ident.height, ident.width) == (32, 40) and ident.seconds >= 0


# ---------------------------------------------------------------------------------------------- report files


def _table(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0]]
    assert header == ["method", "images", "PSNR-Y", "SSIM-Y", "LPIPS", "DISTS", "FID", "KID", "s/image"]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def test_csv_and_markdown_parse_back_to_the_numbers(scored: EvalReport, tmp_path: Path) -> None:
    text = scored.write(tmp_path / "out")
    assert (tmp_path / "out" / "summary.md").read_text() == text
    with open(tmp_path / "out" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and list(rows[0]) == list(CSV_COLUMNS) and {r["protocol"] for r in rows} == {"tadm"}
    for row, ref in zip(rows, scored.rows, strict=True):
        assert (row["path"], int(row["height"]), int(row["width"]), row["method"]) == (
            ref.path,
            ref.height,
            ref.width,
            ref.method,
        )
        for col in ("psnr_y", "ssim_y", "lpips", "dists", "seconds"):
            assert float(row[col]) == getattr(ref, col)  # repr: exact round trip
    assert {r["psnr_y"] for r in rows if r["method"] == "identity"} == {"inf"}

    table = _table(text)
    assert list(table) == ["identity", "light", "heavy"]
    for method, cells in table.items():
        mine = [r for r in rows if r["method"] == method]
        assert int(cells[0]) == 3
        means = [statistics.mean(float(r[c]) for r in mine) for c in ("psnr_y", "ssim_y", "lpips", "dists")]
        if method == "identity":
            assert cells[1] == "inf"
        else:
            assert float(cells[1]) == pytest.approx(means[0], abs=0.006)
        for cell, mean in zip(cells[2:5], means[1:], strict=True):
            assert float(cell) == pytest.approx(mean, abs=6e-5)
        assert cells[5] == cells[6] == "n/a"  # FID, KID off
        assert float(cells[7]) == pytest.approx(statistics.mean(float(r["seconds"]) for r in mine), abs=6e-4)
    assert "PSNR-Y of `identity` is inf on 3 image(s)" in text
    assert "FID/KID not computed: turned off" in text
    assert (
        text.startswith("Protocol: `tadm` (`tadm evaluate --protocol tadm`)\n") and "Protocol `tadm`:" in text
    )

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["protocol"] == {
        "name": "tadm",
        "crop_border": 0,
        "description": get_protocol("tadm").describe(),
    }
    by_method = {m["method"]: m for m in summary["methods"]}
    assert list(by_method) == ["identity", "light", "heavy"] and by_method["identity"]["psnr_y"] == "inf"
    for method, mine in ((m, [r for r in rows if r["method"] == m]) for m in ("light", "heavy")):
        assert by_method[method]["psnr_y"] == pytest.approx(statistics.mean(float(r["psnr_y"]) for r in mine))
        assert (
            by_method[method]["images"] == 3 and by_method[method]["fid"] is by_method[method]["kid"] is None
        )
    assert "FID/KID not computed: turned off." in summary["notes"] and summary["failed"] == []


def test_write_is_atomic_and_replaces(scored: EvalReport, tmp_path: Path) -> None:
    (tmp_path / "summary.md").write_text("old")
    scored.write(tmp_path)
    scored.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_image.csv", "summary.json", "summary.md"]
    assert (tmp_path / "summary.md").read_text().startswith("Protocol: `tadm`")


def test_perceptual_off_leaves_columns_empty_and_says_so(tmp_path: Path) -> None:
    report = evaluate([EvalImage("a.png", _image(0))], {"noisy": _noise(0.1)}, _plain())
    text = report.write(tmp_path)
    with open(tmp_path / "per_image.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["lpips"] == row["dists"] == "" and float(row["psnr_y"]) < 60
    assert _table(text)["noisy"][3:5] == ["n/a", "n/a"]
    assert "LPIPS/DISTS not computed: turned off." in text


def test_a_failing_method_is_recorded_and_the_rest_goes_on() -> None:
    def crops(x: Tensor) -> Tensor:
        return x[..., :-1, :]

    def raises(x: Tensor) -> Tensor:
        raise RuntimeError("decoder exploded")

    images = [EvalImage(f"{i}.png", _image(i)) for i in range(2)]
    report = evaluate(images, {"ok": _identity, "crops": crops, "raises": raises}, _plain())
    assert [(r.path, r.method) for r in report.rows] == [("0.png", "ok"), ("1.png", "ok")]
    assert report.failed and len(report.errors) == 4
    assert {e.method for e in report.errors} == {"crops", "raises"}
    text = report.markdown()
    assert "`0.png` with `raises`: RuntimeError: decoder exploded" in text
    assert "returned shape (1, 3, 31, 40)" in text
    assert _table(text)["raises"][:2] == ["0", "n/a"]


def test_batches_of_same_size_images_report_what_one_at_a_time_reports() -> None:
    """batch_size 3: each method sees same-size images together (a batch waits for its size among the next
    images), a batch a method fails on is retried image by image so only the bad image fails, and the report
    (rows, errors, FID/KID features) is in input order, as with batch size 1."""
    metrics = Metrics(perceptual=False, fid_feature=_TinyFeatures())
    sizes = [(32, 40), (32, 40), (40, 32), (32, 40), (40, 32), (32, 40), (32, 40), (24, 24)]
    images: list[EvalImage | BadImage] = [EvalImage(f"{i}.png", _image(i, *hw)) for i, hw in enumerate(sizes)]
    images.insert(3, BadImage("bad.png", "bad.png: not an image"))
    poison = images[5]  # 4.png, in a batch with 2.png
    assert isinstance(poison, EvalImage)
    seen: list[int] = []

    def noisy(x: Tensor) -> Tensor:
        seen.append(x.shape[0])
        if any(torch.equal(one, poison.image) for one in x):
            raise RuntimeError("a stand-in for an image the model cannot take")
        return (x * 0.9).clamp(-1, 1)  # per sample, like the codec

    one_by_one = evaluate(images, {"noisy": noisy, "identity": _identity}, metrics)
    seen.clear()
    batched = evaluate(images, {"noisy": noisy, "identity": _identity}, metrics, batch_size=3)
    # 0,1,3 (32x40) full; then 2,4 (40x32) fail together and go one by one; 5,6 and 24x24 at the end
    assert seen == [3, 2, 1, 1, 2, 1]
    assert [(r.path, r.method, r.psnr_y, r.ssim_y, r.lr_bpp) for r in batched.rows] == [
        (r.path, r.method, r.psnr_y, r.ssim_y, r.lr_bpp) for r in one_by_one.rows
    ]
    assert batched.errors == one_by_one.errors and [e.path for e in batched.errors] == ["bad.png", "4.png"]
    assert batched.fid == one_by_one.fid and batched.kid == one_by_one.kid
    assert batched.image_digests == one_by_one.image_digests
    assert "batches of up to 3 same-size images" in batched.markdown()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(images, {"noisy": noisy}, metrics, batch_size=0)
    # twelve sizes, none twice: an image waits among at most 4 x batch_size others, then runs alone
    odd = [EvalImage(f"odd{i}.png", _image(100 + i, 24 + 4 * i, 32)) for i in range(12)]
    seen.clear()
    evaluation = engine.Evaluation({"noisy": noisy}, metrics, batch_size=2)
    for image in odd[:8]:
        evaluation.add(image)
    assert seen == []  # 8 waiting: none has a partner yet
    evaluation.add(odd[8])
    assert seen == [1]  # the ninth: the oldest (odd0) runs alone
    for image in odd[9:]:
        evaluation.add(image)
    report = evaluation.finish()
    assert seen == [1] * 12 and [r.path for r in report.rows] == [f"odd{i}.png" for i in range(12)]


# ---------------------------------------------------------------------------------------------- inputs


def test_folder_with_corrupt_files_evaluates_the_good_ones(tmp_path: Path) -> None:
    good = [_write_png(tmp_path / "set" / f"good{i}.png", i) for i in range(2)]
    (tmp_path / "set" / "bad.png").write_bytes(b"this is not a png")
    (tmp_path / "set" / "cut.png").write_bytes(good[0].read_bytes()[:120])
    images = iter_hr_images([str(tmp_path / "set")])
    assert images.total == 4
    report = evaluate(images, {"identity": _identity}, _plain())
    assert sorted(Path(r.path).name for r in report.rows) == ["good0.png", "good1.png"]
    assert report.failed
    assert sorted(Path(e.path).name for e in report.errors) == ["bad.png", "cut.png"]
    assert all(e.method is None and e.path in e.reason for e in report.errors)  # the reason names the file
    text = report.markdown()
    assert "Failed: 2 input(s) could not be read" in text and "bad.png" in text and "cut.png" in text
    assert _table(text)["identity"][0] == "2"


def test_globs_files_and_clear_errors_for_missing_inputs(tmp_path: Path) -> None:
    a = _write_png(tmp_path / "a" / "x.png", 0)
    b = _write_png(tmp_path / "a" / "sub" / "y.png", 1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")

    def paths(*inputs: str) -> list[str]:
        return [item.path for item in iter_hr_images(inputs)]

    assert paths(str(tmp_path / "a" / "**" / "*.png")) == [str(b), str(a)]  # sorted: a/sub/ < a/x
    assert paths(str(tmp_path / "a" / "*.png")) == [str(a)]
    with pytest.warns(UserWarning, match="1 input"):
        assert paths(str(b), str(tmp_path / "a")) == [str(b), str(a)]  # named twice: evaluated once
    first = next(iter_hr_images([str(a)]))
    assert isinstance(first, EvalImage) and torch.equal(first.image, load_image(a))
    with pytest.raises(InputError, match=r"no file matches the input pattern '.*\*\.jpg'"):
        iter_hr_images([str(a), str(tmp_path / "a" / "*.jpg")])  # fails up front, before any work
    with pytest.raises(InputError, match="nope.png' does not exist"):
        iter_hr_images([str(tmp_path / "nope.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty' holds no images"):
        iter_hr_images([str(tmp_path / "empty")])


def test_shards_from_tadm_shard_and_webdataset_tarwriter(tmp_path: Path) -> None:
    import webdataset as wds

    files = [_write_png(tmp_path / "src" / name, i) for i, name in enumerate(["p.q.png", "d/r.png"])]
    pack_shards(tmp_path / "src", tmp_path / "packed")
    packed = iter_hr_images([str(tmp_path / "packed")])
    assert packed.total == 2
    items = list(packed)
    shard = tmp_path / "packed" / "shard-000000.tar"
    assert [i.path for i in items] == [f"{shard}#d/r.png", f"{shard}#p.q.png"]  # original paths, not keys
    assert all(isinstance(i, EvalImage) for i in items)
    assert torch.equal(items[1].image, load_image(files[0]))  # type: ignore[union-attr]

    tar = tmp_path / "wds" / "val-000000.tar"
    tar.parent.mkdir()
    with wds.TarWriter(str(tar)) as writer:
        writer.write({"__key__": "s0", "jpg": _jpeg(_image(5))})
        writer.write({"__key__": "s1", "png": b"broken bytes"})
        writer.write({"__key__": "s2", "json": b"{}"})
        writer.write({"__key__": "s3", "webp": _webp(_image(6))})
    data = tar.read_bytes()
    cut = tmp_path / "wds" / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    records = list(iter_hr_images([str(tmp_path / "wds" / "val-*.tar"), str(cut)]))
    kinds = [(type(r).__name__, r.path) for r in records]
    assert kinds[:4] == [
        ("EvalImage", f"{tar}#s0.jpg"),
        ("BadImage", f"{tar}#s1.png"),
        ("BadImage", f"{tar}#s2"),
        ("EvalImage", f"{tar}#s3.webp"),
    ]
    assert records[0].image.shape == (3, 32, 40)  # type: ignore[union-attr]
    assert "s1.png" in records[1].reason and "no image field" in records[2].reason  # type: ignore[union-attr]
    damaged = [r for r in records[4:] if isinstance(r, BadImage) and r.path == str(cut)]
    assert len(damaged) == 1 and "is damaged after" in damaged[0].reason  # the shard, not a silent stop


def _jpeg(x: Tensor) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png_bytes(x))).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _webp(x: Tensor) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png_bytes(x))).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- FID


def test_fid_without_torch_fidelity_is_na_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.warns(MetricUnavailableWarning, match="torch-fidelity is not installed") as caught:
        metrics = Metrics(perceptual=False)
    assert len(caught) == 1 and not metrics.fid
    images = [EvalImage(f"{i}.png", _image(i)) for i in range(3)]
    report = evaluate(images, {"identity": _identity}, metrics)
    text = report.markdown()
    assert report.fid == report.kid == {"identity": None} and _table(text)["identity"][5:7] == ["n/a", "n/a"]
    assert "FID/KID not computed: the package torch-fidelity is not installed" in text and "tadm[fid]" in text


def test_fid_without_weights_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    try:  # the real path when torch-fidelity is installed, a stand-in for its download otherwise
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

        monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    except ImportError:
        monkeypatch.setattr(fid, "load_fid_inception", offline)
    with pytest.warns(MetricUnavailableWarning) as caught:
        metrics = Metrics(perceptual=False)
    message = str(caught[0].message)
    assert str(tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE) in message and "URLError" in message
    assert not metrics.fid and "FID/KID" in metrics.not_computed


class _TinyFeatures(nn.Module):
    """Stand-in for Inception: uint8 images -> 12 pooled colour features."""

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def test_fid_and_kid_equal_torchmetrics_and_need_two_images() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    metrics = Metrics(perceptual=False, fid_feature=_TinyFeatures())
    images = [EvalImage(f"{i}.png", _image(i)) for i in range(4)]
    recorded: list[Tensor] = []
    noisy = _noise(0.4)

    def heavy(x: Tensor) -> Tensor:
        recorded.append(noisy(x))
        return recorded[-1]

    report = evaluate(images, {"identity": _identity, "heavy": heavy}, metrics)
    ref = FrechetInceptionDistance(feature=_TinyFeatures())
    ref_kid = KernelInceptionDistance(feature=_TinyFeatures(), subset_size=4, subsets=3)
    for image, pred in zip(images, recorded, strict=True):
        for r in (ref, ref_kid):
            r.update(_u8(image.image[None]), real=True)
            r.update(_u8(pred), real=False)
    assert report.fid["heavy"] == pytest.approx(float(ref.compute()), rel=1e-4)
    assert abs(report.fid["identity"]) < 1e-6 < report.fid["heavy"]  # type: ignore[arg-type, operator]
    kid_mean, kid_std = ref_kid.compute()  # every subset is the whole set: the same value each time
    assert report.kid["heavy"] == pytest.approx(float(kid_mean), rel=1e-5) and float(kid_std) < 1e-6
    assert report.kid_std["heavy"] == 0.0
    table = _table(report.markdown())["heavy"]
    assert float(table[5]) == pytest.approx(report.fid["heavy"], abs=0.006)
    assert float(table[6]) == pytest.approx(report.kid["heavy"], abs=6e-5)
    assert (
        "KID of `identity`, `heavy`: subsets of 4 images (all of them, once) instead of the usual 1000"
        in (report.markdown())
    )

    single = evaluate(images[:1], {"identity": _identity}, metrics)
    assert single.fid == single.kid == {"identity": None}
    assert "FID and KID of `identity` are n/a: they need at least 2 images, got 1" in single.markdown()


def test_kid_draws_seeded_subsets_when_the_sets_differ_and_never_fails_the_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A method that failed on one image leaves sets of 5 and 4: KID over 100 random subsets of 4, the same
    every run; a KID that raises leaves FID and the rest of the report alone."""
    metrics = Metrics(perceptual=False, fid_feature=_TinyFeatures())
    images = [EvalImage(f"{i}.png", _image(i)) for i in range(5)]

    def flaky(x: Tensor) -> Tensor:
        if float(x.mean()) == float(images[2].image.mean()):
            raise RuntimeError("out of luck")
        return _noise(0.3)(x)

    first, second = (evaluate(images, {"flaky": flaky}, metrics) for _ in range(2))
    assert first.kid == second.kid and first.kid_std == second.kid_std and first.kid_std["flaky"] > 0  # type: ignore[operator]
    assert "KID of `flaky`: subsets of 4 images (100 random subsets)" in first.markdown() and first.failed

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("singular kernel")

    monkeypatch.setattr(engine, "kernel_inception_distance", broken)
    report = evaluate(images, {"identity": _identity}, metrics)
    assert report.fid["identity"] is not None and report.kid == {"identity": None}
    assert "KID of `identity` is n/a: RuntimeError: singular kernel." in report.markdown()


def test_the_protocol_scores_the_images_and_is_in_every_report_file(tmp_path: Path) -> None:
    """`basicsr` at x4: its values (border crop 4) in the rows, its name in the CSV, its facts in the JSON; an
    image too small for its crop and SSIM window is a failure of that image, not of the run."""
    protocol = get_protocol("basicsr", 4)
    metrics = Metrics(perceptual=False, fid=False, protocol=protocol)
    images = [EvalImage(f"{i}.png", _image(i, 40, 48)) for i in range(2)] + [
        EvalImage("tiny.png", _image(9, 16, 16))
    ]
    noisy = _noise(0.1, seed=3)
    report = evaluate(images, {"noisy": noisy}, metrics)
    text = report.write(tmp_path)
    noisy = _noise(0.1, seed=3)  # the same draws again, for the expected values
    for image, row in zip(images[:2], report.rows, strict=True):
        pred = noisy(image.image[None])
        assert row.psnr_y == float(protocol.psnr_y(pred, image.image[None])[0])
        assert row.ssim_y == float(protocol.ssim_y(pred, image.image[None])[0])
        assert row.psnr_y != pytest.approx(
            float(get_protocol("basicsr", 0).psnr_y(pred, image.image[None])[0])
        )
    assert [(e.path, e.method) for e in report.errors] == [("tiny.png", "noisy")]
    assert "11x11 px (after cutting 4 px per side, the image is 8x8)" in text
    assert (
        text.startswith("Protocol: `basicsr` (`tadm evaluate --protocol basicsr`)")
        and "`crop_border=4`" in text
    )
    with open(tmp_path / "per_image.csv", newline="") as f:
        assert {r["protocol"] for r in csv.DictReader(f)} == {"basicsr"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["protocol"]["name"] == "basicsr" and summary["protocol"]["crop_border"] == 4
    assert summary["failed"] == [{"path": "tiny.png", "method": "noisy", "reason": report.errors[0].reason}]


def _u8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)


def test_gpu_out_of_memory_in_lpips_retries_the_image_on_the_cpu(
    perceptual: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8K images can exhaust a GPU in VGG; the values must come from the CPU copy, with one warning."""
    real = scoring._lpips_dists
    calls: list[str] = []

    def oom_on_gpu(net: nn.Module, p: Tensor, t: Tensor) -> tuple[float, float]:
        calls.append("gpu" if net is perceptual._perceptual else "cpu")
        if calls[-1] == "gpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, p, t)

    monkeypatch.setattr(scoring, "_lpips_dists", oom_on_gpu)
    monkeypatch.setattr(perceptual, "device", torch.device("cuda"))  # only the fallback's branch sees it
    monkeypatch.setattr(perceptual, "_perceptual_cpu", None)
    x, y = _image(0)[None], _noise(0.2)(_image(0)[None])
    with pytest.warns(UserWarning, match="out of memory on cuda"):
        values = perceptual._perceptual_values(y, x)
    assert calls == ["gpu", "cpu"] and values == real(perceptual._perceptual, y, x)


# ------------------------------------------------------------------------------------------------------------
# The command's refusals before any work: one line naming the file, exit 2


def test_evaluate_refuses_an_empty_shard_like_an_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty shard used to give a report of 0 images and exit 0; an empty folder exits 2."""
    from tadm.commands.main import main

    empty = tmp_path / "e.tar"
    with tarfile.open(empty, "w"):
        pass
    (tmp_path / "empty").mkdir()
    for item in (empty, tmp_path / "empty"):
        code = main(["evaluate", "--ckpt", str(tmp_path / "no.ckpt"), str(item), "-o", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and str(item) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("existing", ["per_image.csv", "summary.md", "summary.json"])
def test_evaluate_refuses_to_replace_a_report_without_overwrite(
    existing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report in the output folder is refused before anything loads (one line naming the file, exit 2,
    the file untouched); --overwrite lets the run go on (here to the missing checkpoint)."""
    from tadm.commands.main import main

    image = _write_png(tmp_path / "in" / "a.png", 0)
    out = tmp_path / "r"
    out.mkdir()
    (out / existing).write_text("an earlier run's report")
    argv = ["evaluate", "--ckpt", str(tmp_path / "no.ckpt"), str(image), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(out / existing) in err and "--overwrite" in err and len(err.splitlines()) == 1, err
    assert (out / existing).read_text() == "an earlier run's report"
    assert main([*argv, "--overwrite"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_a_report_written_without_overwrite_never_replaces_one(scored: EvalReport, tmp_path: Path) -> None:
    """The final step of each report file refuses a name another run took after the command's early check."""
    from tadm.ops.files import DestinationExists

    (tmp_path / "summary.md").write_text("theirs")
    with pytest.raises(DestinationExists, match="summary.md"):
        scored.write(tmp_path, overwrite=False)
    assert (tmp_path / "summary.md").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    scored.write(tmp_path, overwrite=True)
    assert (tmp_path / "summary.md").read_text() != "theirs"


def test_a_report_file_that_cannot_be_written_is_named(
    scored: EvalReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while writing a report file: the error (a TadmError and an OSError) names that file, and
    no temp file is left."""
    from tadm.errors import TadmError

    real_write_text = Path.write_text

    def write_text(self: Path, text: str, *a: object, **k: object) -> int:
        if self.name.startswith(".summary.json."):
            real_write_text(self, text[:10], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError) as info:
        scored.write(tmp_path)
    assert isinstance(info.value, TadmError)
    assert str(info.value) == f"cannot write '{tmp_path / 'summary.json'}': No space left on device"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
