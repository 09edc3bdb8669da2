"""The codec commands: tadm downscale / upscale / test on a tiny stage-2 checkpoint, and bad input."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, PngImagePlugin

from tadm.commands.main import main
from tadm.datamodules.image_io import load_image
from tadm.errors import CheckpointError
from tadm.inference.lr_files import read_lr
from tadm.inference.pipeline import color_reference
from tadm.model.checkpoints import export_checkpoint
from tadm.model.loading import load_codec
from tadm.ops.color_fix import apply_color_fix
from tests.helpers import SAMPLES

FAST = [
    "--latent-tile",
    "16",
    "--latent-overlap",
    "8",
    "--vae-tile",
    "128",
    "--vae-overlap",
    "32",
    "--no-progress",
]


@pytest.fixture
def ckpt(stage2_ckpt: Path) -> Path:
    """A tiny stage-2 (enhancer) checkpoint after one optimiser step (shared, see conftest)."""
    return stage2_ckpt


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos of odd sizes (not multiples of 16), plus gray / RGBA / 16-bit / 1x1 variants."""

    def photo(name: str) -> np.ndarray:
        return np.asarray(Image.open(SAMPLES / name).convert("RGB"))

    root = tmp_path_factory.mktemp("photos")
    astronaut, gray = (
        photo("train/astronaut.png"),
        np.asarray(Image.open(SAMPLES / "train/astronaut.png").convert("L")),
    )
    Image.fromarray(astronaut[::4, ::4][:75, :101]).save(root / "astronaut.png")
    Image.fromarray(photo("val/coffee.png")[::4, ::4][:90, :61]).save(root / "coffee.jpg", quality=95)
    Image.fromarray(gray[::8, ::8][:33, :47]).save(root / "gray.png")
    chelsea = photo("val/chelsea.png")[::6, ::6]
    Image.fromarray(np.dstack([chelsea, np.full(chelsea.shape[:2], 200, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(gray[::8, ::8].astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(root / "one.png")
    Image.fromarray(photo("train/rocket.jpg")[::10, ::10]).save(root / "rocket.v2.png")  # a dot in the stem
    return root


def _run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_downscale_upscale_restores_odd_sizes_and_lr_is_bit_exact(
    ckpt: Path, photos: Path, tmp_path: Path, one_thread: None
) -> None:
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    assert _run("downscale", "--ckpt", ckpt, photos, "--output", lr, *FAST) == 0
    assert _run("upscale", "--ckpt", ckpt, lr, "--output", hr, "--save-timesteps", *FAST) == 0
    codec = load_codec(ckpt)
    for src in sorted(photos.iterdir()):
        x = load_image(src)
        y_file, meta = read_lr(lr / f"{src.stem}.png")
        assert meta is not None and (meta.hr_height, meta.hr_width) == tuple(x.shape[-2:])
        assert meta.scale == 16 and meta.rescaler_id == codec.rescaler_id and meta.model_id == codec.model_id
        # the PNG holds exactly the quantised LR tensor the model produces
        y_model, size = codec.downscale(x[None])
        assert torch.equal(y_file, y_model), src.name
        assert y_file.shape[-2:] == (-(-x.shape[-2] // 16), -(-x.shape[-1] // 16))
        out = load_image(hr / f"{src.stem}.png")
        assert out.shape == x.shape, src.name  # original (odd) size restored from the metadata alone
        heat = Image.open(hr / f"{src.stem}.timesteps.png")
        assert heat.size == (x.shape[-1], x.shape[-2])
    # files are ordinary images with ordinary permissions
    assert (lr / "astronaut.png").stat().st_mode & 0o044 == 0o044


def test_upscale_matches_the_in_memory_round_trip(ckpt: Path, photos: Path, tmp_path: Path) -> None:
    codec = load_codec(ckpt)
    x = load_image(photos / "astronaut.png")[None]
    rt = codec.round_trip(x)
    y, size = codec.downscale(x)
    up = codec.upscale(y, size)
    torch.testing.assert_close(up.image, rt.reconstruction)
    assert up.timesteps is not None and 10 <= up.timesteps.min() <= up.timesteps.max() <= 200
    # --color-fix: the same reconstruction, corrected towards the bicubic upscale of its LR image
    fixed = load_codec(ckpt, color_fix="wavelet")
    reference = color_reference(y, codec.scale, size)
    torch.testing.assert_close(fixed.upscale(y, size).image, apply_color_fix(up.image, reference, "wavelet"))
    torch.testing.assert_close(fixed.round_trip(x).reconstruction, fixed.upscale(y, size).image)
    assert (fixed.upscale(y, size).image - up.image).abs().mean() > 1e-3


def test_reruns_skip_existing_and_interrupted_writes_leave_nothing(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lr = tmp_path / "lr"
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the third file: write some bytes, then die like a killed process
            Path(str(fp)).write_bytes(b"\x89PNG\r\n\x1a\npartial")
            raise KeyboardInterrupt
        real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    assert (
        _run("downscale", "--ckpt", ckpt, photos, "--output", lr, *FAST) == 130
    )  # Ctrl-C: one line, no traceback
    monkeypatch.setattr(Image.Image, "save", real_save)
    leftovers = sorted(p.name for p in lr.iterdir())
    assert len(leftovers) == 2 and all(n.endswith(".png") and not n.startswith(".") for n in leftovers)
    for name in leftovers:
        assert read_lr(lr / name)[1] is not None  # complete files only
    # a re-run finishes the rest and skips what exists
    capsys.readouterr()
    assert _run("downscale", "--ckpt", ckpt, photos, "--output", lr, *FAST) == 0
    assert "downscaled 5 file(s), skipped 2 existing" in capsys.readouterr().out
    assert len(list(lr.iterdir())) == 7
    before = (lr / "one.png").stat().st_mtime_ns
    assert _run("downscale", "--ckpt", ckpt, photos / "one.png", "--output", lr, "--overwrite", *FAST) == 0
    assert (lr / "one.png").stat().st_mtime_ns >= before


def test_bad_files_are_reported_and_the_rest_finished(
    ckpt: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("astronaut.png", "gray.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("not a png either")
    good = (photos / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match=r"skipping 1 file\(s\) that are not images.*notes.txt"):
        code = _run("downscale", "--ckpt", ckpt, folder, "--output", tmp_path / "lr", *FAST)
    err = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "lr").iterdir()) == ["astronaut.png", "gray.png"]
    assert "fake.png" in err.err and "truncated.jpg" in err.err and "2 failed" in err.out


def _lr_with(tmp_path: Path, src: Path, **changes: str) -> Path:
    im = Image.open(src)
    info = PngImagePlugin.PngInfo()
    text = {**im.text, **changes}
    for k, v in text.items():
        if v is not None:
            info.add_text(k, v)
    out = tmp_path / f"edited_{len(list(tmp_path.glob('edited_*')))}.png"
    im.save(out, pnginfo=info)
    return out


def test_lr_files_from_elsewhere(
    ckpt: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lr = tmp_path / "lr"
    assert _run("downscale", "--ckpt", ckpt, photos / "astronaut.png", "--output", lr, *FAST) == 0
    src = lr / "astronaut.png"
    # no metadata: assume the checkpoint's scale, warn
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.open(src).convert("RGB").save(plain / "plain.png")
    with pytest.warns(UserWarning, match="no tadm metadata; assuming .* x16"):
        assert _run("upscale", "--ckpt", ckpt, plain / "plain.png", "--output", tmp_path / "o1", *FAST) == 0
    w, h = Image.open(src).size
    assert Image.open(tmp_path / "o1" / "plain.png").size == (w * 16, h * 16)
    # another model's or another scale's LR file: a clear error per file, exit 1
    other = _lr_with(tmp_path, src, **{"tadm:rescaler_id": "0123456789abcdef"})
    assert _run("upscale", "--ckpt", ckpt, other, "--output", tmp_path / "o2", *FAST) == 1
    assert "made by a different model" in capsys.readouterr().err
    x32 = _lr_with(tmp_path, src, **{"tadm:scale": "32"})
    assert _run("upscale", "--ckpt", ckpt, x32, "--output", tmp_path / "o3", *FAST) == 1
    assert "scale x32, this checkpoint is x16" in capsys.readouterr().err
    resized = tmp_path / "resized.png"
    Image.open(src).resize((w + 3, h)).save(resized, pnginfo=_info(Image.open(src).text))
    assert _run("upscale", "--ckpt", ckpt, resized, "--output", tmp_path / "o4", *FAST) == 1
    assert "was it resized" in capsys.readouterr().err


def _info(text: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    return info


def test_checkpoint_for_a_missing_backbone_names_it(ckpt: Path, tmp_path: Path) -> None:
    c = torch.load(ckpt, weights_only=False)
    cfg = yaml.safe_load(c["tadm"]["config"])
    cfg["model"]["backbone"]["class_path"] = "stable_diffusion"  # the real family, not the test twin
    cfg["model"]["backbone"]["init_args"].update(
        preset="sd21-base", pretrained=str(tmp_path / "no_such_sd21")
    )
    c["tadm"]["config"] = yaml.safe_dump(cfg)
    bad = tmp_path / "bad.ckpt"
    torch.save(c, bad)
    with pytest.raises(CheckpointError, match=r"needs backbone 'sd21-base'.*no_such_sd21"):
        load_codec(bad)
    assert _run("upscale", "--ckpt", bad, SAMPLES / "val", "--output", tmp_path / "o", *FAST) == 2
    assert not (tmp_path / "o").exists()


def test_load_codec_compiles_the_upscale_networks_and_keeps_the_old_keyword(ckpt: Path) -> None:
    """``compile=True`` (``--compile``) goes through ``TADMModel.prepare_inference``: UNet, rescaler upscale,
    aligner and Refiner (lazily compiled: nothing runs here); ``compile_unet`` still works, with a warning."""
    plain = load_codec(ckpt).module
    assert not hasattr(plain.backbone.unet, "_orig_mod") and plain.aligner._compiled_call_impl is None
    for codec in (load_codec(ckpt, compile=True), None):
        if codec is None:
            with pytest.warns(DeprecationWarning, match="compile_unet"):
                codec = load_codec(ckpt, compile_unet=True)
        m = codec.module
        assert hasattr(m.backbone.unet, "_orig_mod") and "upscale" in vars(m.rescaler)
        assert m.aligner._compiled_call_impl is not None and m.enhancer._compiled_call_impl is not None


def test_exported_checkpoint_writes_the_same_lr(ckpt: Path, photos: Path, tmp_path: Path) -> None:
    exported = export_checkpoint(ckpt, tmp_path / "model.safetensors")
    a, b = load_codec(ckpt), load_codec(exported)
    assert a.rescaler_id == b.rescaler_id  # LR files of one decode with the other
    x = load_image(photos / "coffee.jpg")[None]
    assert torch.equal(a.downscale(x)[0], b.downscale(x)[0])
    y, size = a.downscale(x)
    diff = (a.upscale(y, size).image - b.upscale(y, size).image).abs().max()
    assert diff < 0.05  # bf16-rounded enhancer weights: close, not equal


def test_tadm_evaluate_writes_csv_and_summary_with_bicubic_row(
    ckpt: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code = _run(
        "evaluate", "--ckpt", ckpt, photos / "astronaut.png", photos / "coffee.jpg", "--output", out,
        "--no-fid", *FAST,
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    methods = {r["method"] for r in rows}
    assert len(rows) == 4 and any(m.startswith("tadm last.ckpt") for m in methods)
    assert "bicubic x16" in methods
    for r in rows:
        assert 5 < float(r["psnr_y"]) < 60 and 0 < float(r["ssim_y"]) <= 1 and float(r["seconds"]) > 0
        assert r["lpips"] != "" and r["dists"] != ""
    summary = (out / "summary.md").read_text()
    assert "bicubic x16" in summary and "FID" in summary and "--no-fid" in summary
    assert summary.strip() in capsys.readouterr().out
    assert summary.startswith("Protocol: `tadm`") and {r["protocol"] for r in rows} == {"tadm"}

    # --protocol basicsr: the scale (16) is its border crop; the report says so in all three files
    out = tmp_path / "basicsr"
    args = ["evaluate", "--ckpt", ckpt, photos / "astronaut.png", "-o", out, "--no-fid", "--no-perceptual"]
    assert _run(*args, "--protocol", "basicsr", *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["name"] == "basicsr" and summary["protocol"]["crop_border"] == 16
    assert (out / "summary.md").read_text().startswith("Protocol: `basicsr`")
    cropped = list(csv.DictReader((out / "per_image.csv").open()))
    assert {r["protocol"] for r in cropped} == {"basicsr"} and len(cropped) == 2
    full = {r["method"]: float(r["psnr_y"]) for r in rows if r["path"].endswith("astronaut.png")}
    assert all(abs(float(r["psnr_y"]) - full[r["method"]]) > 1e-3 for r in cropped)  # the crop matters
    assert {r["color_fix"] for r in rows} == {"none"}

    # --color-fix: recorded in all three files; the bicubic row is its own reference (unchanged)
    out = tmp_path / "wavelet"
    args = ["evaluate", "--ckpt", ckpt, photos / "astronaut.png", "-o", out, "--no-fid", "--no-perceptual"]
    assert _run(*args, "--color-fix", "wavelet", *FAST) == 0
    assert json.loads((out / "summary.json").read_text())["color_fix"] == "wavelet"
    assert (
        "Colour correction: `wavelet` (`tadm evaluate --color-fix wavelet`)"
        in (out / "summary.md").read_text()
    )
    fixed = {r["method"]: r for r in csv.DictReader((out / "per_image.csv").open())}
    assert {r["color_fix"] for r in fixed.values()} == {"wavelet"}
    assert float(fixed["bicubic x16"]["psnr_y"]) == pytest.approx(full["bicubic x16"], abs=1e-3)
    model = next(m for m in fixed if m.startswith("tadm"))
    assert abs(float(fixed[model]["psnr_y"]) - full[model]) > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_keeps_the_lr_exact_and_the_output_close(
    ckpt: Path, photos: Path, precision: str, one_thread: None
) -> None:
    from tadm.evaluation.metrics import psnr_y

    full, half = load_codec(ckpt), load_codec(ckpt, precision=precision)  # type: ignore[arg-type]
    x = load_image(photos / "astronaut.png")[None]
    y32, size = full.downscale(x)
    y16, _ = half.downscale(x)
    assert torch.equal(y32, y16)  # the rescaler always runs in fp32: the same LR file everywhere
    a, b = full.upscale(y32, size).image, half.upscale(y16, size).image
    assert torch.isfinite(b).all() and b.dtype == torch.float32
    assert psnr_y(b, a).item() > 30.0
    with pytest.raises(ValueError, match="precision"):
        load_codec(ckpt, precision="fp8")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# A command never destroys its inputs, checks its output before the work, refuses what is not an LR file


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_output_folder_that_is_or_holds_the_inputs_is_refused_before_any_work(
    ckpt: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("astronaut.png", "coffee.jpg"):
        (src / name).write_bytes((photos / name).read_bytes())
    before = _tree(src)
    for verb in ("downscale", "upscale"):
        for extra in ([], ["--overwrite"]):
            assert _run(verb, "--ckpt", ckpt, src, "--output", src, *extra, *FAST) == 2
            assert "the folder inputs are never read from (the output folder)" in capsys.readouterr().err
    assert _tree(src) == before  # nothing replaced, nothing added
    # an output folder inside the input folder is never read back as input on the next run
    out = src / "lr"
    assert _run("downscale", "--ckpt", ckpt, src, "--output", out, *FAST) == 0
    assert _run("downscale", "--ckpt", ckpt, src, "--output", out, "--overwrite", *FAST) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "astronaut.png",
        "coffee.png",
    ]
    assert not (out / "lr").exists()


def test_an_unusable_output_is_an_error_before_the_model_loads(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tadm.commands.downscale_upscale as codec_commands

    def no_model(args: object) -> None:
        raise AssertionError("the model must not load before the output is checked")

    monkeypatch.setattr(codec_commands, "load_from_args", no_model)
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"x")
    for output in (a_file, a_file / "sub"):
        code = _run("downscale", "--ckpt", ckpt, photos / "astronaut.png", "--output", output, *FAST)
        err = capsys.readouterr().err
        assert code == 2 and str(output) in err and len(err.strip().splitlines()) == 1


def test_a_full_size_photo_given_to_upscale_is_refused_not_attempted(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "in" / "photo.png"
    big.parent.mkdir()
    Image.fromarray(np.full((24, 1100, 3), 90, np.uint8)).save(big)  # x16 would be 17600 px wide
    out = tmp_path / "out"
    assert _run("upscale", "--ckpt", ckpt, big.parent, "--output", out, *FAST) == 1
    assert "looks like a full-size image, not an LR file" in capsys.readouterr().err
    assert not list(out.rglob("*.png"))


def test_backbone_option_on_a_weight_free_backbone_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    from tests.helpers.cli import build_cli, data_args

    quickstart = str(SAMPLES.parents[1] / "configs" / "quickstart.yaml")
    cli = build_cli(["--config", quickstart, "--trainer.fast_dev_run=1", *data_args()])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = tmp_path / "s2d.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    code = _run(
        "downscale", "--ckpt", ckpt, photos / "astronaut.png", "-o", tmp_path / "o", "--backbone", tmp_path
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "loads no weights" in err and "--backbone" in err and len(err.splitlines()) == 1


def test_evaluate_without_vgg_weights_still_reports_psnr_and_names_the_flag(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    out = tmp_path / "report"
    assert _run("evaluate", "--ckpt", ckpt, photos / "astronaut.png", "-o", out, "--no-fid", *FAST) == 0
    captured = capsys.readouterr()
    assert "--no-perceptual" in captured.err and "vgg16-397923af.pth" in captured.err
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert rows and all(float(r["psnr_y"]) > 5 and r["lpips"] == "" for r in rows)
    assert "LPIPS/DISTS not computed: VGG16 weights missing" in (out / "summary.md").read_text()


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def test_evaluate_prints_its_table_when_the_report_cannot_be_written(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tadm.evaluation.report as report

    def disk_full(path: object, text: str, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", disk_full)
    code = _run("evaluate", "--ckpt", ckpt, photos / "astronaut.png", "-o", tmp_path / "r", "--no-fid", *FAST)
    captured = capsys.readouterr()
    assert code == 1 and "| bicubic x16 |" in captured.out and "No space left on device" in captured.err


def test_an_output_folder_that_cannot_be_written_is_one_line(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read-only folder (root can write anywhere, so the refusal is simulated where tadm probes)."""
    import tempfile

    def read_only(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code = _run("downscale", "--ckpt", ckpt, photos / "astronaut.png", "-o", tmp_path / "ro", *FAST)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot be written: Permission denied" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Two runs writing one output folder: without --overwrite nothing is ever replaced


@pytest.mark.parametrize("verb", ["downscale", "upscale"])
def test_an_output_another_run_finishes_meanwhile_is_kept_and_counted_skipped(
    verb: str,
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The early "exists?" check passes, then another process finishes the same name before our final step
    (simulated from inside our PNG encoder, no timing): its file stays, ours is dropped (no temp file left),
    and the run reports a skip, not a failure. With --overwrite the same race replaces it."""
    src = photos / "astronaut.png"
    if verb == "upscale":
        assert _run("downscale", "--ckpt", ckpt, src, "--output", tmp_path / "lr", *FAST) == 0
        src = tmp_path / "lr" / "astronaut.png"
    out = tmp_path / "out"
    dest = out / "astronaut.png"
    theirs = b"\x89PNG written by the other run"
    real_save = Image.Image.save

    def other_run_finishes_first(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        real_save(self, fp, *a, **k)
        if Path(str(fp)).name.startswith(".astronaut.png."):  # our temp file, not the heat map's
            dest.write_bytes(theirs)

    monkeypatch.setattr(Image.Image, "save", other_run_finishes_first)
    capsys.readouterr()
    assert _run(verb, "--ckpt", ckpt, src, "--output", out, *FAST) == 0
    assert f"{verb}d 0 file(s), skipped 1 existing, 0 failed" in capsys.readouterr().out
    assert dest.read_bytes() == theirs
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png"]  # no temp file left behind
    assert _run(verb, "--ckpt", ckpt, src, "--output", out, "--overwrite", *FAST) == 0
    assert dest.read_bytes() != theirs and read_lr(dest)[0].shape[0] == 1


# ---------------------------------------------------------------------------------------------------------
# A full disk names the file being written and leaves nothing behind


def _disk_full_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The disk fills while the temp file of ``name`` is written: a few bytes land, then ENOSPC."""
    real_save = Image.Image.save

    def save(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        if Path(str(fp)).name.startswith(f".{name}."):
            Path(str(fp)).write_bytes(b"\x89PNG\r\n\x1a\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_full_disk_names_the_output_and_leaves_no_temp_file(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "lr"
    _disk_full_at(monkeypatch, "coffee.png")
    args = ("downscale", "--ckpt", ckpt, photos / "astronaut.png", photos / "coffee.jpg", "--output", out)
    assert _run(*args, *FAST) == 1
    captured = capsys.readouterr()
    line = f"cannot write '{out / 'coffee.png'}': No space left on device"
    assert line in captured.err and line in captured.out  # on stderr when it happens, and in the summary
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png"]  # no temp file, no partial file


def test_evaluate_names_the_report_file_it_cannot_write_and_leaves_no_temp_file(
    ckpt: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tadm.ops.files as files

    real_fsync = files.fsync_file

    def fsync_file(path: str | os.PathLike[str]) -> None:  # delayed allocation: the flush finds the disk full
        if Path(path).name.startswith(".summary.md."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path)

    monkeypatch.setattr(files, "fsync_file", fsync_file)
    out = tmp_path / "r"
    code = _run(
        "evaluate", "--ckpt", ckpt, photos / "astronaut.png", "-o", out, "--no-fid", "--no-perceptual", *FAST
    )
    captured = capsys.readouterr()
    assert code == 1 and "| bicubic x16 |" in captured.out  # the numbers are shown anyway
    assert f"cannot write '{out / 'summary.md'}': No space left on device" in captured.err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------
# The output size an upscale accepts is a memory limit


def test_an_upscale_over_the_memory_limit_is_refused_with_its_cost_and_the_option(ckpt: Path) -> None:
    """Files with and without metadata: the refusal says what the output would cost and which option raises
    the limit; under the limit (or with it raised) the size is returned."""
    from tadm.errors import LRFileError
    from tadm.inference.codec import BYTES_PER_HR_PIXEL
    from tadm.inference.lr_files import LRMeta

    codec = load_codec(ckpt)
    y = torch.zeros(1, 3, 8, 12)  # x16: 192x128 = 0.025 MP
    meta = LRMeta(128, 192, 16, codec.rescaler_id, codec.model_id)
    for m in (meta, None):
        with pytest.warns(UserWarning) if m is None else contextlib.nullcontext():
            assert codec.target_size(y, m, "a.png", max_hr_megapixels=0.03) == (128, 192)
        with pytest.raises(LRFileError) as info:
            codec.target_size(y, m, "a.png", max_hr_megapixels=0.02)
        message = str(info.value)
        mb = 192 * 128 * BYTES_PER_HR_PIXEL / 1e6
        assert message.startswith("a.png: restoring it to 192x128 px (0.02 MP) would take about")
        assert (
            f"{mb:.1f} MB of memory" in message and "--max-hr-megapixels 0.03 upscales it anyway" in message
        )


def test_the_default_limit_refuses_a_restore_the_side_limit_let_through(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 1024x1024 PNG without metadata becomes 16384x16384 at x16: within --max-hr-side 16384, but 268 MP
    (about 9 GB): refused by default, before any work; the limit is a plain option of tadm upscale."""
    from tadm.inference.codec import Codec

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a restore over the memory limit must not be attempted")

    monkeypatch.setattr(Codec, "upscale", never)
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.fromarray(np.full((1024, 1024, 3), 90, np.uint8)).save(big)
    assert _run("upscale", "--ckpt", ckpt, big, "--output", tmp_path / "out", *FAST) == 1
    err = capsys.readouterr().err
    assert "16384x16384 px (268.4 MP) would take about" in err and "GB of memory" in err
    assert "--max-hr-megapixels 269 upscales it anyway" in err
    assert not (tmp_path / "out").exists()
