"""The demo's work without a browser or gradio: a photo's round trip is the commands' (the LR file byte for byte
``tadm downscale``'s, PSNR/SSIM exactly ``tadm evaluate``'s), every bad input is one line naming the file and
the next one works, Stop stops at the next tile and leaves nothing, progress counts the tiles the codec cuts,
and an enhancer's timestep map is ``tadm upscale --save-timesteps``'s."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tadm.commands.main import main
from tadm.demo.jobs import Cancelled
from tadm.demo.results import PhotoResult
from tadm.demo.round_trip import Demo
from tadm.demo.uploads import DemoError
from tadm.inference.tiling import Tiling
from tadm.model.loading import load_codec
from tests.demo.cli_reference import downscaled_file, evaluated_rows
from tests.helpers import REPO, SAMPLES

QUICKSTART = REPO / "assets" / "models" / "quickstart_x16.safetensors"
CHELSEA = SAMPLES / "val" / "chelsea.png"
#: the tiny stage-2 twin's tiles, small enough to cut a 96 px photo into several (as tests/inference/test_codec.py)
FAST_TILING = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32)
FAST_OPTIONS = ("--latent-tile", "16", "--latent-overlap", "8", "--vae-tile", "128", "--vae-overlap", "32")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Demo:
    """The shipped quickstart model, as ``tadm demo`` serves it by default."""
    return Demo(load_codec(QUICKSTART), tmp_path_factory.mktemp("demo"))


def _photo(tmp_path: Path, name: str, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Path:
    """A crop of a real photo, saved in ``mode`` (16-bit, palette, CMYK, ...)."""
    with Image.open(CHELSEA) as im:
        crop = im.convert("RGB").crop((150, 60, 150 + size[0], 60 + size[1]))
    path = tmp_path / name
    if mode == "I;16":
        gray = np.asarray(crop.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path)
    else:
        crop.convert(mode).save(path)
    return path


def _no_wrappers_left(demo: Demo) -> bool:
    m = demo.codec.module
    return not {"downscale", "upscale"} & set(vars(m.rescaler)) and not {"encode", "decode"} & set(
        vars(m.backbone)
    )


def test_a_photos_round_trip_is_the_commands_one(demo: Demo, tmp_path: Path) -> None:
    result = demo.round_trip(CHELSEA)
    h, w = 300, 451
    assert result.hr_size == (h, w) and result.restored.shape == result.bicubic.shape == (h, w, 3)
    assert result.lr_size == (-(-h // 16), -(-w // 16)) == (19, 29)
    # the LR file is the one `tadm downscale` writes, byte for byte, and its pixels are what the page shows
    cli_lr = downscaled_file(QUICKSTART, CHELSEA, tmp_path / "lr")
    assert result.lr_file.read_bytes() == cli_lr.read_bytes()
    assert np.array_equal(np.asarray(Image.open(cli_lr)), result.lr)
    assert result.bits_per_pixel == pytest.approx(8 * cli_lr.stat().st_size / (h * w))
    # the restored file is the one `tadm upscale` writes from that LR file
    assert (
        main(["upscale", "--ckpt", str(QUICKSTART), str(cli_lr), "-o", str(tmp_path / "hr"), "--no-progress"])
        == 0
    )
    assert result.restored_file.read_bytes() == (tmp_path / "hr" / "chelsea.png").read_bytes()
    # the scores are `tadm evaluate`'s for this photo, for the model and for bicubic
    rows = evaluated_rows(QUICKSTART, CHELSEA, tmp_path / "report", "--no-perceptual")
    for method in ("restored", "bicubic"):
        assert result.scores[method].psnr_y == float(rows[method]["psnr_y"]), method
        assert result.scores[method].ssim_y == float(rows[method]["ssim_y"]), method
    # the page scores later, from the 8-bit images it saved: the same numbers, bit for bit
    assert demo.score(result.original, result.restored, result.bicubic) == result.scores
    later = demo.round_trip(CHELSEA, scores=False)
    assert later.scores == {} and "scores" not in later.seconds
    assert demo.score(later.original, later.restored, later.bicubic) == result.scores
    assert (
        demo.round_trip(CHELSEA, scores=None).scores == result.scores
    )  # auto: a small photo is scored at once
    assert result.timesteps is None and not result.notes  # a stage-1 model: no timestep map
    assert _no_wrappers_left(demo)


@pytest.mark.slow  # ~10 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_lpips_when_the_vgg_weights_are_there(tmp_path: Path, torch_home: Path, one_thread: None) -> None:
    """conftest's TORCH_HOME holds a random VGG16 where torchvision looks: LPIPS/DISTS are computed, as
    ``tadm evaluate`` computes them."""
    demo = Demo(load_codec(QUICKSTART), tmp_path / "work")
    assert demo.perceptual_metrics is not None, demo.perceptual_note
    photo = _photo(tmp_path, "crop.png", (64, 48))
    result = demo.round_trip(photo)
    assert result.scores["restored"].lpips is None  # the result comes first; LPIPS after it
    scores = demo.perceptual(result.original, result.restored, result.bicubic)
    assert scores is not None
    rows = evaluated_rows(QUICKSTART, photo, tmp_path / "report")
    for method in ("restored", "bicubic"):
        assert scores[method].psnr_y == float(rows[method]["psnr_y"]), method
        assert scores[method].lpips == pytest.approx(float(rows[method]["lpips"]), abs=1e-6), method
        assert scores[method].dists == pytest.approx(float(rows[method]["dists"]), abs=1e-6), method
    tiny = demo.round_trip(_photo(tmp_path, "tiny.png", (40, 24)))
    assert demo.perceptual(tiny.original, tiny.restored, tiny.bicubic) is None
    assert "undefined under 32 px" in str(demo.perceptual_reason(tiny.hr_size))


def test_no_vgg_weights_no_lpips_and_no_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    demo = Demo(load_codec(QUICKSTART), tmp_path / "work")
    assert demo.perceptual_metrics is None and "no VGG16 weights (vgg16-397923af.pth" in demo.perceptual_note
    result = demo.round_trip(_photo(tmp_path, "crop.png"))
    assert demo.perceptual(result.original, result.restored, result.bicubic) is None
    assert demo.perceptual_reason(result.hr_size) == demo.perceptual_note
    assert not (tmp_path / "empty").exists()  # nothing was fetched


def _truncated(tmp_path: Path) -> Path:
    data = CHELSEA.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.png"


def _tadm_lr_file(tmp_path: Path, demo: Demo) -> Path:
    return demo.round_trip(_photo(tmp_path, "small.png")).lr_file


REFUSED = {
    "not an image": (lambda tmp, demo: _text(tmp, "notes.png"), "notes.png: not an image file"),
    "empty file": (lambda tmp, demo: _text(tmp, "empty.jpg", ""), "empty.jpg: "),
    "truncated": (lambda tmp, demo: _truncated(tmp), "truncated.png: file is truncated"),
    "a tadm LR file": (_tadm_lr_file, "is an LR file made by tadm (x16, for a 96x64 photo): restore it in"),
}


def _text(tmp_path: Path, name: str, text: str = "a shopping list, not a photo") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_photo_is_one_line_and_the_next_one_works(demo: Demo, tmp_path: Path, case: str) -> None:
    make, expected = REFUSED[case]
    path = make(tmp_path, demo)
    with pytest.raises(DemoError) as err:
        demo.round_trip(path)
    message = str(err.value)
    assert expected in message and "\n" not in message and str(tmp_path) not in message, message
    assert _no_wrappers_left(demo)
    assert demo.round_trip(_photo(tmp_path, "next.png")).lr_size == (4, 6)


def test_the_size_limit_is_said_before_decoding(
    demo: Demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "max_pixels", 5000)
    monkeypatch.setattr(demo, "max_megapixels", 0.005)
    with pytest.raises(
        DemoError, match=r"big.png: 96x64 px \(0.0 MP\) is above this demo's limit of 0.005 MP"
    ):
        demo.round_trip(_photo(tmp_path, "big.png"))


@pytest.mark.parametrize(
    ("mode", "note"),
    [
        ("CMYK", "is CMYK: converted to RGB"),
        ("P", "is a palette image: converted to RGB"),
        ("I;16", "has 16 bits per sample"),
        ("RGBA", "has transparency: composited over white"),
        ("L", "is grayscale"),
    ],
)
def test_unusual_photos_are_read_as_the_commands_read_them_and_said(
    demo: Demo, tmp_path: Path, mode: str, note: str
) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    photo = _photo(tmp_path, f"photo{suffix}", mode=mode)
    result = demo.round_trip(photo)
    assert any(note in line for line in result.notes), result.notes
    assert demo.score(result.original, result.restored, result.bicubic) == result.scores  # 16-bit too
    assert result.lr_file.read_bytes() == downscaled_file(QUICKSTART, photo, tmp_path / "lr").read_bytes()


def test_a_one_pixel_photo_round_trips_with_a_note(demo: Demo, tmp_path: Path) -> None:
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(tmp_path / "one.png")
    result = demo.round_trip(tmp_path / "one.png")
    assert result.hr_size == (1, 1) and result.lr_size == (1, 1)
    assert any("1x1 px is smaller than one LR pixel at x16" in line for line in result.notes), result.notes


def _edited_lr(src: Path, dest: Path, **changes: str) -> Path:
    with Image.open(src) as im:
        info = PngImagePlugin.PngInfo()
        for key, value in {**im.text, **changes}.items():
            info.add_text(key, value)
        im.save(dest, pnginfo=info)
    return dest


def test_an_lr_file_restored_alone_is_tadm_upscales(demo: Demo, tmp_path: Path) -> None:
    trip = demo.round_trip(_photo(tmp_path, "crop.png", (101, 75)))
    result = demo.restore(trip.lr_file, name="crop.lr.png")
    assert result.hr_size == (75, 101) and not result.notes
    assert result.restored_file.read_bytes() == trip.restored_file.read_bytes()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("another model", "other.png: LR file was made by a different model"),
        ("another scale", "x32.png: LR file was made at scale x32, this checkpoint is x16"),
        ("a full-size photo", "retina.jpg: a 1411x1411 image without tadm metadata would become"),
        ("not an image", "notes.png: not an image file"),
        (
            "too large once restored",
            "restoring it gives a 7216x4800 px image (34.6 MP), above this demo's limit",
        ),
    ],
)
def test_a_bad_lr_file_is_one_line_and_the_next_one_works(
    demo: Demo, tmp_path: Path, case: str, expected: str
) -> None:
    lr = demo.round_trip(_photo(tmp_path, "crop.png")).lr_file
    path = {
        "another model": lambda: _edited_lr(
            lr, tmp_path / "other.png", **{"tadm:rescaler_id": "0123456789abcdef"}
        ),
        "another scale": lambda: _edited_lr(lr, tmp_path / "x32.png", **{"tadm:scale": "32"}),
        "a full-size photo": lambda: SAMPLES / "train" / "retina.jpg",
        "not an image": lambda: _text(tmp_path, "notes.png"),
        "too large once restored": lambda: CHELSEA,  # no metadata: x16 of 451x300
    }[case]()
    with pytest.raises(DemoError) as err:
        demo.restore(path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert demo.restore(lr).hr_size == (64, 96)


def test_an_lr_file_without_metadata_is_restored_at_the_models_scale_with_a_note(
    demo: Demo, tmp_path: Path
) -> None:
    lr = demo.round_trip(_photo(tmp_path, "crop.png")).lr_file
    Image.open(lr).convert("RGB").save(tmp_path / "plain.png")  # the text chunks dropped
    result = demo.restore(tmp_path / "plain.png")
    assert result.hr_size == (64, 96)
    assert any("plain.png: no tadm metadata; assuming" in line for line in result.notes), result.notes


def test_stop_stops_at_the_next_tile_and_leaves_nothing(demo: Demo, tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, text: str) -> None:
        seen.append(text)
        if "tile" in text:
            cancel.set()  # the user presses Stop during the first tile

    before = set(demo.work_dir.iterdir())
    with pytest.raises(Cancelled):
        demo.round_trip(CHELSEA, progress=progress, cancel=cancel)
    assert sum("tile" in text for text in seen) == 1, seen
    assert set(demo.work_dir.iterdir()) == before and _no_wrappers_left(demo)
    cancel.clear()
    assert demo.round_trip(CHELSEA, cancel=cancel).lr_size == (19, 29)


def test_progress_counts_the_tiles_the_codec_cuts(tmp_path: Path, one_thread: None) -> None:
    """Rescaler tiles of 8 LR pixels with 2 of context: a 451x300 photo is 29x19 LR pixels, 7x4 tiles."""
    codec = load_codec(QUICKSTART, tiling=Tiling(lr_tile=8, lr_overlap=2))
    demo = Demo(codec, tmp_path / "work", perceptual=False)
    reports: list[tuple[float, str]] = []
    result = demo.round_trip(CHELSEA, progress=lambda f, t: reports.append((f, t)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    texts = [t for _, t in reports]
    assert any("downscale: " in t and "rescaler tile 28/28" in t for t in texts), texts
    assert any("restore: " in t and "rescaler tile 28/28" in t for t in texts), texts
    assert not any("rescaler tile 29" in t for t in texts)
    tiled = downscaled_file(QUICKSTART, CHELSEA, tmp_path / "lr", "--lr-tile", "8", "--lr-overlap", "2")
    assert result.lr_file.read_bytes() == tiled.read_bytes()  # the tiles are the command's with these options


def test_an_enhancers_timestep_map_is_tadm_upscales(
    stage2_ckpt: Path, tmp_path: Path, one_thread: None
) -> None:
    """The tiny stage-2 twin: the map shown and offered is the heat map `tadm upscale --save-timesteps` writes,
    and progress counts its enhancer tiles."""
    demo = Demo(load_codec(stage2_ckpt, tiling=FAST_TILING), tmp_path / "work", perceptual=False)
    reports: list[str] = []
    result: PhotoResult = demo.round_trip(
        _photo(tmp_path, "crop.png", (160, 136)), progress=lambda f, t: reports.append(t)
    )
    assert result.timesteps is not None and result.timesteps.shape == (136, 160, 3)
    assert result.aligner_range is not None and result.timestep_range is not None
    lo, hi = result.timestep_range
    assert result.aligner_range[0] <= lo <= hi <= result.aligner_range[1]
    hr = tmp_path / "hr"
    argv = ["upscale", "--ckpt", str(stage2_ckpt), str(result.lr_file), "-o", str(hr), "--save-timesteps"]
    assert main([*argv, "--no-progress", *FAST_OPTIONS]) == 0
    assert result.timesteps_file is not None
    assert result.timesteps_file.read_bytes() == (hr / "crop.lr.timesteps.png").read_bytes()
    assert result.restored_file.read_bytes() == (hr / "crop.lr.png").read_bytes()
    enhancer = [t for t in reports if "enhancer tile" in t]  # 20x18 latent pixels in tiles of 16, overlap 8
    assert enhancer and enhancer[-1].split("enhancer tile ")[1].split(",")[0] == "4/4", enhancer[-1]
