"""``--batch-size`` of tadm downscale / upscale / evaluate: same-size inputs together, outputs as with 1.

Inputs are grouped by size (read from their headers) and batched within a group; outputs keep their names, a
bad file is reported alone and the others of its batch are written. The LR files are byte-identical to batch
size 1's, for the shipped quickstart model and the tiny SD 2.1 enhancer twin; the restored images are the same
but for a rare value one 8-bit level off: PyTorch picks other kernels for a batch than for one small image
(docs/codec.md, "Batches"), which moves a float by ~1e-7, and now and then that crosses a rounding boundary.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadm.commands.main import main
from tadm.inference.codec import Codec
from tests.helpers import REPO, SAMPLES

QUICKSTART = REPO / "assets" / "models" / "quickstart_x16.safetensors"
FAST = ["--latent-tile", "16", "--latent-overlap", "8", "--vae-tile", "128", "--vae-overlap", "32"]


def _run(*args: str | Path) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 80x112 crops of real photos (one in a subfolder, one a JPEG), two of another size, one 1x1."""
    root = tmp_path_factory.mktemp("same_size")
    (root / "sub").mkdir()
    sources = sorted((SAMPLES / "heldout").glob("*.png"))
    for i, src in enumerate(sources[:5]):
        crop = np.asarray(Image.open(src).convert("RGB"))[:80, :112]
        where = root / "sub" if i == 2 else root
        Image.fromarray(crop).save(where / (f"p{i}.jpg" if i == 4 else f"p{i}.png"), quality=95)
    for i, src in enumerate(sources[5:7]):
        Image.fromarray(np.asarray(Image.open(src).convert("RGB"))[:50, :70]).save(root / f"q{i}.png")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(root / "one.png")
    return root


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(root / name), np.int16) for name in _tree(root)}


def _check_as_batch_one(lr: dict[int, Path], hr: dict[int, Path], batch: int) -> None:
    """LR files byte for byte batch 1's; restored images at most one 8-bit level off, at under 0.1 % of values."""
    assert _tree(lr[batch]) == _tree(lr[1])
    ones, many = _pixels(hr[1]), _pixels(hr[batch])
    assert many.keys() == ones.keys()
    for name, image in ones.items():
        diff = np.abs(many[name] - image)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())


def test_quickstart_batches_write_what_batch_one_writes(photos: Path, tmp_path: Path) -> None:
    """Downscale and upscale in batches of 3 with the shipped model: the same LR files and restored images."""
    lr, hr = {b: tmp_path / f"lr{b}" for b in (1, 3)}, {b: tmp_path / f"hr{b}" for b in (1, 3)}
    for batch in (1, 3):
        assert _run("downscale", "--ckpt", QUICKSTART, photos, "-o", lr[batch], "--batch-size", batch) == 0
        assert _run("upscale", "--ckpt", QUICKSTART, lr[batch], "-o", hr[batch], "--batch-size", batch) == 0
    assert len(_tree(lr[1])) == len(_tree(hr[1])) == 8 and "sub/p2.png" in _tree(lr[1])
    _check_as_batch_one(lr, hr, 3)


def test_the_batches_are_same_size_groups_of_up_to_n(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five same-size photos at --batch-size 3 go as 3 + 2 images, the other size as 2, the 1x1 alone; the
    upscale's batches follow its memory limit too (--max-hr-megapixels: the sum of a batch's outputs)."""
    calls: dict[str, list[int]] = {"downscale": [], "upscale": []}
    for name in calls:
        inner = getattr(Codec, name)

        def spy(self: Codec, y: torch.Tensor, *args: object, _inner=inner, _name=name) -> object:  # type: ignore[no-untyped-def]
            calls[_name].append(y.shape[0])
            return _inner(self, y, *args)

        monkeypatch.setattr(Codec, name, spy)
    lr = tmp_path / "lr"
    assert _run("downscale", "--ckpt", QUICKSTART, photos, "-o", lr, "--batch-size", "3") == 0
    assert sorted(calls["downscale"]) == [1, 2, 2, 3]
    assert _run("upscale", "--ckpt", QUICKSTART, lr, "-o", tmp_path / "hr", "--batch-size", "8") == 0
    assert sorted(calls["upscale"]) == [1, 2, 5]
    calls["upscale"].clear()
    # 80x112 px outputs are 0.009 MP (padded to 80x112): a 0.02 MP limit lets two through at a time
    args = ["upscale", "--ckpt", QUICKSTART, lr, "-o", tmp_path / "hr2", "--batch-size", "8"]
    assert _run(*args, "--max-hr-megapixels", "0.02") == 0
    assert sorted(calls["upscale"]) == [1, 1, 2, 2, 2]


def test_a_bad_file_in_a_batch_fails_alone(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that cannot be read, and one the batched model call fails on, are reported by name; the others
    of their batch are written, as batch 1 writes them."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(photos.glob("p*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    good = (folder / "p0.png").read_bytes()
    (folder / "p1.png").write_bytes(good[: len(good) // 2])  # same header size, truncated pixels
    lr1, lr4 = tmp_path / "lr1", tmp_path / "lr4"
    assert _run("downscale", "--ckpt", QUICKSTART, folder, "-o", lr1) == 1
    assert _run("downscale", "--ckpt", QUICKSTART, folder, "-o", lr4, "--batch-size", "4") == 1
    err = capsys.readouterr()
    assert err.err.count("p1.png") == 2 and "1 failed" in err.out
    assert _tree(lr4) == _tree(lr1) and sorted(_tree(lr4)) == ["p0.png", "p3.png"]

    # the model fails on a batch that holds a black image: retried one by one, only that one fails
    (folder / "p1.png").unlink()
    Image.fromarray(np.zeros((80, 112, 3), np.uint8)).save(folder / "p1.png")
    inner = Codec.downscale

    def picky(self: Codec, x: torch.Tensor) -> object:
        if (x.flatten(1) == -1).all(dim=1).any():
            raise RuntimeError("CUDA out of memory (stand-in)")
        return inner(self, x)

    monkeypatch.setattr(Codec, "downscale", picky)
    assert _run("downscale", "--ckpt", QUICKSTART, folder, "-o", tmp_path / "lr_b", "--batch-size", "4") == 1
    err = capsys.readouterr()
    assert "CUDA out of memory (stand-in)" in err.err and "1 failed" in err.out
    assert _tree(tmp_path / "lr_b") == _tree(lr1)


def test_existing_outputs_are_skipped_and_the_rest_batched(photos: Path, tmp_path: Path) -> None:
    lr = tmp_path / "lr"
    assert _run("downscale", "--ckpt", QUICKSTART, photos / "p0.png", "-o", lr) == 0
    before = (lr / "p0.png").stat().st_mtime_ns
    assert _run("downscale", "--ckpt", QUICKSTART, photos, "-o", lr, "--batch-size", "4") == 0
    assert (lr / "p0.png").stat().st_mtime_ns == before and len(_tree(lr)) == 8


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_batch_size_below_one_is_a_usage_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        _run("downscale", "--ckpt", QUICKSTART, tmp_path, "-o", tmp_path / "out", "--batch-size", value)
    assert stop.value.code == 2 and "--batch-size" in capsys.readouterr().err


@pytest.mark.slow  # ~11 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_the_enhancer_twin_in_batches(
    stage2_ckpt: Path, photos: Path, tmp_path: Path, one_thread: None
) -> None:
    """Stage 2 on the tiny SD 2.1 twin (VAE, TPM, UNet, Refiner; on tiles): the same LR files and restored
    images as batch 1, with --save-timesteps heat maps per image."""
    inputs = [photos / f"p{i}.png" for i in (0, 1, 3)]
    lr, hr = {b: tmp_path / f"lr{b}" for b in (1, 3)}, {b: tmp_path / f"hr{b}" for b in (1, 3)}
    for batch in (1, 3):
        args = ["--batch-size", batch, *FAST]
        assert _run("downscale", "--ckpt", stage2_ckpt, *inputs, "-o", lr[batch], *args) == 0
        assert (
            _run("upscale", "--ckpt", stage2_ckpt, lr[batch], "-o", hr[batch], "--save-timesteps", *args) == 0
        )
    assert sorted(_tree(hr[3])) == [
        "p0.png",
        "p0.timesteps.png",
        "p1.png",
        "p1.timesteps.png",
        "p3.png",
        "p3.timesteps.png",
    ]
    _check_as_batch_one(lr, hr, 3)


def test_evaluate_in_batches_reports_what_batch_one_reports(photos: Path, tmp_path: Path) -> None:
    """per_image.csv as with batch size 1 (rows in input order), but for the timings; summary.json says how the
    timings were shared."""
    reports = {}
    for batch in (1, 3):
        out = tmp_path / f"eval{batch}"
        args = ["evaluate", "--ckpt", QUICKSTART, photos, "-o", out, "--no-fid", "--no-perceptual"]
        args += ["--batch-size", batch]
        assert _run(*args) == 0
        rows = list(csv.DictReader((out / "per_image.csv").open()))
        summary = json.loads((out / "summary.json").read_text())
        reports[batch] = rows, summary
    (rows1, sum1), (rows3, sum3) = reports[1], reports[3]
    assert len(rows1) == 16 and len(rows3) == 16
    metrics = ("psnr_y", "ssim_y", "lpips", "dists")
    for one, many in zip(rows1, rows3, strict=True):  # in input order, the same facts, the same scores
        assert {k: v for k, v in many.items() if k not in (*metrics, "seconds")} == {
            k: v for k, v in one.items() if k not in (*metrics, "seconds")
        }
        for k in metrics:  # to float rounding: a restored value may be one 8-bit level off (see the top)
            assert (many[k] == one[k] == "") or float(many[k]) == pytest.approx(
                float(one[k]), rel=1e-3, abs=1e-4
            )
    assert any("batches of up to 3" in note for note in sum3["notes"])
    assert not any("batches" in note for note in sum1["notes"])
