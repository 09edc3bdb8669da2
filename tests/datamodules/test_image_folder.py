"""Image decoding, folder listing, crops and bad-file handling of the image-folder datamodule."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, default_collate

from tadm.datamodules.bad_input import InputSkippedWarning
from tadm.datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset
from tadm.datamodules.image_io import ImageReadError, image_size, list_images, load_image
from tadm.datamodules.image_transforms import CropAugment, random_crop_flip, reduce_contrast, reflect_pad
from tests.helpers.loggers import MetricsLogger

# ------------------------------------------------------------------------------------------------------------
# helpers


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _expected(arr: np.ndarray, max_value: float = 255.0) -> torch.Tensor:
    """What load_image should return for an (H, W, 3) array: CHW, scaled to [-1, 1]."""
    unit = torch.from_numpy(arr.astype(np.float64) / max_value)
    return (unit * 2 - 1).permute(2, 0, 1).float()


def _write_png16(path: Path, arr: np.ndarray) -> Path:
    """Minimal 16-bit PNG writer (gray, gray+alpha, RGB, RGBA): Pillow cannot write 16-bit color PNGs."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = arr.astype(">u2").reshape(h, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def _truncated_png(path: Path, seed: int = 1) -> Path:
    """A PNG whose header is intact (so the header check passes) but whose pixel data is cut off."""
    _save(path, _rgb(64, 64, seed))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return path


def _folder(root: Path, n: int = 3, size: tuple[int, int] = (40, 48)) -> list[Path]:
    return [_save(root / f"img{i}.png", _rgb(*size, seed=i)) for i in range(n)]


# ------------------------------------------------------------------------------------------------------------
# load_image: conversions


def test_rgb8_values_exact(tmp_path: Path) -> None:
    arr = _rgb(5, 7)
    out = load_image(_save(tmp_path / "a.png", arr))
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7)
    torch.testing.assert_close(out, _expected(arr), rtol=0, atol=1e-6)


def test_grayscale_replicated_to_three_equal_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 51, 255], [128, 204, 17]], dtype=np.uint8)
    out = load_image(_save(tmp_path / "g.png", gray))
    assert out.shape == (3, 2, 3)
    expected = torch.from_numpy(gray / 255.0 * 2 - 1).float()
    for c in range(3):
        torch.testing.assert_close(out[c], expected, rtol=0, atol=1e-6)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    out = load_image(_save(tmp_path / "a.png", rgba))
    assert torch.equal(out[:, 0, 0], torch.ones(3))  # fully transparent -> white
    assert torch.equal(out[:, 0, 1], torch.tensor([1.0, -1.0, -1.0]))  # opaque red stays red
    a = 128 / 255  # half-transparent blue: blue stays 1, red/green go halfway to white
    torch.testing.assert_close(out[:, 0, 2], torch.tensor([1 - 2 * a, 1 - 2 * a, 1.0]), rtol=0, atol=1e-6)


def test_gray_alpha_and_palette_transparency_over_white(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert torch.equal(out[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(out[:, 0, 1], torch.full((3,), 10 / 255 * 2 - 1), rtol=0, atol=1e-6)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert torch.equal(out[:, 0, 0], torch.ones(3))  # palette entry 0 is transparent black -> white
    assert torch.equal(out[:, 0, 1], torch.tensor([-1.0, 1.0, -1.0]))


def test_16bit_grayscale_png_scaled_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 1]], dtype=np.uint16)
    _save(tmp_path / "g16.png", values)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really stored as 16-bit
    out = load_image(tmp_path / "g16.png")
    assert out[0, 0, 0] == -1.0 and out[0, 0, 2] == 1.0
    assert abs(out[0, 0, 1].item()) < 1e-4
    torch.testing.assert_close(out[0, 0, 3], torch.tensor(2 / 65535 - 1), rtol=0, atol=1e-6)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_16bit_rgb_png_keeps_low_byte(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    rgb[0, 0] = [65535, 0, 32768]
    rgb[0, 1] = [256, 257, 1]  # differ only in the low byte
    path = _write_png16(tmp_path / "rgb16.png", rgb)
    with Image.open(path) as im:  # what Pillow 13 does on its own: 8-bit "RGB", high bytes only
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), (rgb >> 8).astype(np.uint8))
    out = load_image(path)
    torch.testing.assert_close(out, _expected(rgb, 65535.0), rtol=0, atol=1e-6)
    assert out[1, 0, 1] > out[0, 0, 1]


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_16bit_rgb_tiff_keeps_low_byte(tmp_path: Path, byteorder: str, compression: str | None) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.default_rng(0).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb.astype(byteorder + "u2"), photometric="rgb", compression=compression)
    torch.testing.assert_close(load_image(path), _expected(rgb, 65535.0), rtol=0, atol=1e-6)


def test_16bit_planar_tiff_refused_not_garbled(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 5), dtype=np.uint16), photometric="rgb", planarconfig="separate")
    with pytest.raises(ImageReadError, match="planar.tif.*planar"):
        image_size(path)  # refused at the header check already


def test_16bit_rgba_and_gray_alpha_png(tmp_path: Path) -> None:
    rgba = np.random.default_rng(1).integers(0, 65536, (3, 4, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    out = load_image(_write_png16(tmp_path / "rgba16.png", rgba))
    unit = rgba.astype(np.float64) / 65535
    composited = unit[..., :3] * unit[..., 3:] + (1 - unit[..., 3:])
    torch.testing.assert_close(out, _expected(composited, 1.0), rtol=0, atol=1e-6)
    assert torch.equal(out[:, 0, 0], torch.ones(3))

    la = np.random.default_rng(2).integers(0, 65536, (3, 4, 2), dtype=np.uint16)
    out = load_image(_write_png16(tmp_path / "la16.png", la))
    unit = la.astype(np.float64) / 65535
    gray = unit[..., :1] * unit[..., 1:] + (1 - unit[..., 1:])
    torch.testing.assert_close(out, _expected(np.repeat(gray, 3, axis=-1), 1.0), rtol=0, atol=1e-6)


def test_float_tiff_assumed_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 1.0, 1.5]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")
    torch.testing.assert_close(out[0, 0], torch.tensor([-1.0, -0.5, 1.0, 1.0]))  # 1.5 clipped


def test_cmyk_converted(tmp_path: Path) -> None:
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    out = load_image(tmp_path / "c.tif")
    assert torch.equal(out[:, 1, 1], torch.tensor([1.0, -1.0, -1.0]))


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".PNG"])
def test_common_formats_load(tmp_path: Path, ext: str) -> None:
    arr = np.zeros((16, 24, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 100, 30  # flat color: lossy codecs stay close
    out = load_image(_save(tmp_path / f"a{ext}", arr))
    assert out.shape == (3, 16, 24)
    lossless = ext in (".bmp", ".tif", ".tiff", ".PNG")
    torch.testing.assert_close(out, _expected(arr), rtol=0, atol=1e-6 if lossless else 0.05)


def test_exif_orientation_applied_consistently(tmp_path: Path) -> None:
    arr = _rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path / "rot.png", arr, exif=exif.tobytes())
    out = load_image(path)
    assert out.shape == (3, 6, 4) and image_size(path) == (6, 4)
    torch.testing.assert_close(out, _expected(np.rot90(arr, k=-1).copy()), rtol=0, atol=1e-6)


def test_image_size_reads_header(tmp_path: Path) -> None:
    assert image_size(_save(tmp_path / "a.jpg", _rgb(30, 40))) == (30, 40)


@pytest.mark.parametrize("make", [_corrupt_png, _truncated_png])
def test_bad_files_raise_image_read_error_naming_file(tmp_path: Path, make) -> None:
    path = make(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="bad.png") as info:
        load_image(path)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)
    problem = "truncated" if make is _truncated_png else "not an image"
    assert problem in str(info.value)


def test_missing_file_and_non_image_header(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="bad.png.*not an image"):
        image_size(_corrupt_png(tmp_path / "bad.png"))


def test_decompression_bomb_is_an_image_read_error(tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path / "huge.png", _rgb(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > 2x the limit: refused by Pillow
    with pytest.raises(ImageReadError, match="huge.png.*decompression bomb"):
        image_size(path)


def test_truncated_rejected_even_with_load_truncated_images(tmp_path: Path, monkeypatch) -> None:
    path = _truncated_png(tmp_path / "t.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match="t.png.*truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


# ------------------------------------------------------------------------------------------------------------
# list_images


def test_list_images_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    _save(tmp_path / "b.PNG", _rgb(4, 4))
    _save(tmp_path / "a.JpG", _rgb(4, 4))
    _save(tmp_path / "sub" / "deeper" / "c.tiff", _rgb(4, 4))
    _save(tmp_path / "sub" / "d.webp", _rgb(4, 4))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "archive.png.bak").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with an image-like name
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.JpG", "b.PNG", "sub/d.webp", "sub/deeper/c.tiff"]


def test_list_images_follows_symlinked_folders_without_looping(tmp_path: Path) -> None:
    _save(tmp_path / "elsewhere" / "x.png", _rgb(4, 4))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path / "data")]
    assert found == ["data/linked/x.png"]


def test_list_images_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        list_images(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------
# crops, padding, flips


def test_random_crop_is_a_window_of_the_source(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", _rgb(40, 48))
    source = load_image(path)
    ds = ImageFolderDataset([path], mode="train", crop_size=16)
    windows = source.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 25, 33, 16, 16): every 16x16 window
    for seed in range(8):
        torch.manual_seed(seed)
        crop = ds[0]["image"]
        assert crop.shape == (3, 16, 16)
        matches = [
            (y, x)
            for y in range(windows.shape[1])
            for x in range(windows.shape[2])
            if torch.equal(windows[:, y, x], crop) or torch.equal(windows[:, y, x].flip(-1), crop)
        ]
        assert len(matches) == 1


def test_small_image_reflect_padded_to_crop(tmp_path: Path) -> None:
    path = _save(tmp_path / "small.png", _rgb(30, 40))  # 40 wide, 30 high
    ds = ImageFolderDataset([path], mode="train", crop_size=64)
    torch.manual_seed(0)
    crop = ds[0]["image"]
    assert crop.shape == (3, 64, 64)
    # centered, like reflect_pad; the crop is then the whole padded image, possibly flipped
    expected = torch.from_numpy(
        np.pad(load_image(path).numpy(), ((0, 0), (17, 17), (12, 12)), mode="reflect")
    )
    assert torch.equal(crop, expected) or torch.equal(crop, expected.flip(-1))


def test_reflect_pad_repeats_reflection_beyond_image_size() -> None:
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = reflect_pad(image, 20, 11)
    expected = np.pad(image.numpy(), ((0, 0), (8, 9), (3, 4)), mode="reflect")
    assert torch.equal(out, torch.from_numpy(expected))
    assert reflect_pad(image, 2, 2) is image  # already large enough: untouched
    assert torch.equal(reflect_pad(torch.ones(3, 1, 1), 4, 4), torch.ones(3, 4, 4))


def test_flips_and_crops_reproducible_with_manual_seed() -> None:
    image = torch.randn(3, 32, 32)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([random_crop_flip(image, 16) for _ in range(6)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    flipped = []
    for seed in range(16):
        torch.manual_seed(seed)
        full = random_crop_flip(image, 32)  # crop == image, so only the flip varies
        flipped.append(torch.equal(full, image.flip(-1)))
        assert flipped[-1] or torch.equal(full, image)
    assert any(flipped) and not all(flipped)


def test_eval_mode_returns_whole_unpadded_image(tmp_path: Path) -> None:
    arr = _rgb(30, 41)
    path = _save(tmp_path / "a.png", arr)
    sample = ImageFolderDataset([path], mode="eval")[0]
    assert sample["path"] == str(path)
    torch.testing.assert_close(sample["image"], _expected(arr), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# datamodule: configuration, setup, bad files


@pytest.mark.parametrize(("crop_size", "scale"), [(100, 16), (48, 32), (0, 16), (-16, 16), (12, 4)])
def test_crop_size_must_be_multiple_of_scale_and_8(crop_size: int, scale: int) -> None:
    with pytest.raises(ValueError, match="crop_size"):
        ImageFolderDataModule(train_dir="x", crop_size=crop_size, scale=scale)


def test_valid_crop_sizes_accepted() -> None:
    ImageFolderDataModule(crop_size=64, scale=32)
    ImageFolderDataModule(crop_size=24, scale=4)


def test_missing_folder_error_names_folder(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "no-such-dir"), crop_size=16)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        dm.setup("fit")


def test_stage_without_its_folder_is_a_clear_error(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(val_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train_dir"):
        dm.setup("fit")


def test_corrupt_file_error_mode_fails_setup(tmp_path: Path) -> None:
    _folder(tmp_path)
    _corrupt_png(tmp_path / "garbage.png")
    dm = ImageFolderDataModule(train_dir=str(tmp_path), crop_size=16, on_bad_image="error")
    with pytest.raises(ImageReadError, match="garbage.png"):
        dm.setup("fit")


def test_corrupt_file_skip_mode_warns_counts_and_logs(tmp_path: Path) -> None:
    good = _folder(tmp_path)
    _corrupt_png(tmp_path / "garbage.png")
    logged = []
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path), val_dir=str(tmp_path), crop_size=16
    )  # skip: the default
    dm.trainer = SimpleNamespace(logger=SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step))))
    with pytest.warns(InputSkippedWarning, match="garbage.png.*not an image"):
        dm.setup("fit")
    assert dm.num_skipped == 1  # same folder for train and val: scanned once
    assert logged == [({"data/num_skipped": 1}, 0)]
    assert dm.datasets["train"].files == good and dm.datasets["val"].files == good
    dm.setup("validate")
    assert dm.num_skipped == 1 and len(logged) == 1


def test_truncated_file_error_mode_raises_from_getitem(tmp_path: Path) -> None:
    _folder(tmp_path, n=2)
    bad = _truncated_png(tmp_path / "cut.png")
    dm = ImageFolderDataModule(test_dir=str(tmp_path), crop_size=16, on_bad_image="error")
    dm.setup("test")  # the header is fine
    ds = dm.datasets["test"]
    index = ds.files.index(bad)
    with pytest.raises(ImageReadError, match="cut.png.*truncated"):
        ds[index]


def test_truncated_file_skip_mode_serves_next_image(tmp_path: Path) -> None:
    good = _folder(tmp_path, n=2)
    bad = _truncated_png(tmp_path / "cut.png")
    dm = ImageFolderDataModule(test_dir=str(tmp_path), crop_size=16, on_bad_image="skip")
    dm.setup("test")
    ds = dm.datasets["test"]
    assert dm.num_skipped == 0 and len(ds) == 3
    index = ds.files.index(bad)
    with pytest.warns(InputSkippedWarning, match="cut.png.*truncated"):
        sample = ds[index]
    assert sample["path"] in {str(p) for p in good}
    assert ds.num_skipped == 1 and sample["_skipped"] == 1  # the sample carries its process's count
    served = [ds[i]["path"] for i in range(len(ds))]  # known-bad file is not retried (no new warning)
    assert set(served) == {str(p) for p in good} and ds.num_skipped == 1
    # the module learns the count from the batches (in a Trainer: on_before_batch_transfer)
    assert dm.num_skipped == 0
    batch = dm.on_before_batch_transfer(default_collate([sample]), 0)
    assert dm.num_skipped == 1 and set(batch) == {"image", "path"}


def test_all_files_unreadable_in_skip_mode_is_an_error(tmp_path: Path) -> None:
    _corrupt_png(tmp_path / "a.png")
    dm = ImageFolderDataModule(test_dir=str(tmp_path), on_bad_image="skip")
    with pytest.warns(InputSkippedWarning), pytest.raises(ValueError, match="no readable images"):
        dm.setup("test")


def test_dataloader_workers_reraise_naming_file(tmp_path: Path, monkeypatch) -> None:
    _folder(tmp_path, n=3)
    _truncated_png(tmp_path / "broken.png")
    dm = ImageFolderDataModule(test_dir=str(tmp_path), num_workers=2, on_bad_image="error")
    dm.setup("test")
    loader = dm.test_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    with pytest.raises(ImageReadError, match="broken.png"):
        for _ in loader:
            pass
    # After a worker error torch waits 5 s per worker before killing them; shut down now to keep tests fast.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    loader._iterator._shutdown_workers()


class _MeanModule(L.LightningModule):
    """One parameter; checks that the data module took its skip counters out of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert "_skipped" not in batch and "_source" not in batch
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_decode_failures_in_a_worker_are_counted_and_logged_with_the_header_skips(tmp_path: Path) -> None:
    _folder(tmp_path, n=3, size=(24, 24))
    _corrupt_png(tmp_path / "garbage.png")  # fails the header check at setup
    _truncated_png(tmp_path / "cut.png")  # passes it, fails to decode in the DataLoader worker
    logger = MetricsLogger()
    dm = ImageFolderDataModule(train_dir=str(tmp_path), crop_size=16, batch_size=1, num_workers=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    with pytest.warns(InputSkippedWarning, match="rank 0: 2 unreadable"):  # the teardown report
        trainer.fit(_MeanModule(), datamodule=dm)
    assert trainer.global_step == 4  # the bad file's turn is served by a good one
    assert dm.num_skipped == 2
    assert logger.values("data/num_skipped") == [1, 2]


# ------------------------------------------------------------------------------------------------------------
# datamodule: dataloaders


def test_train_loader_batches_crops_and_repeats(tmp_path: Path) -> None:
    _folder(tmp_path, n=3, size=(40, 48))
    dm = ImageFolderDataModule(train_dir=str(tmp_path), crop_size=32, scale=16, batch_size=2, train_repeats=4)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12
    loader = dm.train_dataloader()
    assert loader.drop_last and not loader.persistent_workers
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["path"]) == 2
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert dm.val_dataloader() == []  # no val_dir


def test_tiny_folder_still_yields_a_batch(tmp_path: Path) -> None:
    _folder(tmp_path, n=1, size=(20, 20))
    dm = ImageFolderDataModule(train_dir=str(tmp_path), crop_size=32, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert not loader.drop_last
    assert [b["image"].shape for b in loader] == [(1, 3, 32, 32)]


def test_eval_batching_only_for_equal_sizes(tmp_path: Path) -> None:
    _folder(tmp_path / "same", n=3, size=(24, 32))
    _folder(tmp_path / "mixed", n=2, size=(24, 32))
    _save(tmp_path / "mixed" / "z.png", _rgb(32, 24))
    dm = ImageFolderDataModule(
        val_dir=str(tmp_path / "same"), test_dir=str(tmp_path / "mixed"), val_batch_size=2
    )
    dm.setup("validate")
    dm.setup("test")
    assert [b["image"].shape[0] for b in dm.val_dataloader()] == [2, 1]
    with pytest.warns(UserWarning, match="different sizes"):
        loader = dm.test_dataloader()
    shapes = [tuple(b["image"].shape) for b in loader]
    assert shapes == [(1, 3, 24, 32), (1, 3, 24, 32), (1, 3, 32, 24)]


def test_dataloader_before_setup_is_a_clear_error(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(train_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        dm.train_dataloader()


def test_image_read_error_survives_one_argument_reconstruction() -> None:
    err = ImageReadError(os.path.join("x", "a.png"), "file is truncated")
    assert str(err) == f"cannot read image '{os.path.join('x', 'a.png')}': file is truncated"
    rebuilt = ImageReadError(f"Caught ImageReadError in DataLoader worker process 0.\n{err}")
    assert "a.png" in str(rebuilt)


def test_real_dataloader_sample_shapes(tmp_path: Path) -> None:
    files = _folder(tmp_path, n=2, size=(16, 16))
    ds = ImageFolderDataset(files, mode="eval")
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["path"] == [str(f) for f in files]


def test_cache_images_decodes_each_file_once(tmp_path, monkeypatch) -> None:
    """With cache_images the decoder runs once per file, and cached crops equal uncached ones."""
    import tadm.datamodules.image_folder as imf

    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    calls: list[str] = []
    real = imf.load_image

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(imf, "load_image", counting)
    files = sorted(tmp_path.glob("*.png"))
    cached = imf.ImageFolderDataset(files, mode="train", crop_size=16, repeats=5, cache_images=True)
    plain = imf.ImageFolderDataset(files, mode="train", crop_size=16, repeats=5)
    torch.manual_seed(3)
    a = [cached[i]["image"] for i in range(len(cached))]
    assert len(calls) == 2
    torch.manual_seed(3)
    b = [plain[i]["image"] for i in range(len(plain))]
    assert len(calls) == 2 + 10
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_color_augment_permutes_the_channels_of_the_same_crop(tmp_path: Path) -> None:
    """Same seed, same crop: the augmented crop's channels are the plain crop's in some order, and over
    a few draws more than one order appears (every hue family is seen by a colour-narrow training set)."""
    (path,) = _folder(tmp_path, n=1, size=(64, 80))
    plain = ImageFolderDataset([path], mode="train", crop_size=32)
    mixed = ImageFolderDataset([path], mode="train", crop_size=32, augment=CropAugment(color_augment=True))
    orders = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = plain[0]["image"]
        torch.manual_seed(seed)
        b = mixed[0]["image"]
        order = tuple(next(j for j in range(3) if torch.equal(b[i], a[j])) for i in range(3))
        assert sorted(order) == [0, 1, 2]
        orders.add(order)
    assert len(orders) > 1
    assert torch.equal(
        ImageFolderDataset([path], mode="eval", augment=CropAugment(color_augment=True))[0]["image"],
        load_image(path),
    )


def test_smooth_fraction_mixes_in_flat_and_gradient_fields_over_the_whole_gamut(tmp_path: Path) -> None:
    """smooth_fraction=1: every training crop is a flat colour or a bilinear gradient in [-1, 1], and
    saturated channel values (exactly -1 or 1) are common; 0 keeps the photo crops; eval is untouched."""
    (path,) = _folder(tmp_path, n=1, size=(64, 80))
    smooth = ImageFolderDataset([path], mode="train", crop_size=32, augment=CropAugment(smooth_fraction=1.0))
    torch.manual_seed(0)
    fields = [smooth[0]["image"] for _ in range(40)]
    flat = 0
    for f in fields:
        assert f.shape == (3, 32, 32) and f.min() >= -1 and f.max() <= 1
        # bilinear: second differences vanish along both axes
        assert f.diff(n=2, dim=-1).abs().max() < 1e-5 and f.diff(n=2, dim=-2).abs().max() < 1e-5
        flat += int(f.amax(dim=(1, 2)).sub(f.amin(dim=(1, 2))).max() < 1e-6)
    assert 5 < flat < 35  # both flat colours and gradients
    corners = torch.stack([f[:, 0, 0] for f in fields])
    assert (corners.abs() == 1).float().mean() > 0.3  # saturated channels are frequent
    plain = ImageFolderDataset([path], mode="train", crop_size=32, augment=CropAugment(smooth_fraction=0.0))
    torch.manual_seed(0)
    a = plain[0]["image"]
    torch.manual_seed(0)
    b = ImageFolderDataset([path], mode="train", crop_size=32)[0]["image"]
    assert torch.equal(a, b)
    assert torch.equal(
        ImageFolderDataset([path], mode="eval", augment=CropAugment(smooth_fraction=1.0))[0]["image"],
        load_image(path),
    )
    with pytest.raises(ValueError, match="smooth_fraction"):
        ImageFolderDataset([path], mode="train", augment=CropAugment(smooth_fraction=1.5))


def test_low_contrast_fraction_scales_the_photo_crop_around_its_mean(tmp_path: Path) -> None:
    """low_contrast_fraction=1: each crop is the very crop the plain dataset gives (same seed), its
    deviations from each channel's mean scaled by one factor in [1/16, 1/2]; the factors vary. 0 draws
    nothing more from the RNG, so recipes without it keep their crops; eval is untouched."""
    (path,) = _folder(tmp_path, n=1, size=(64, 80))
    plain = ImageFolderDataset([path], mode="train", crop_size=32)
    faint = ImageFolderDataset(
        [path], mode="train", crop_size=32, augment=CropAugment(low_contrast_fraction=1.0)
    )
    factors = []
    for seed in range(12):
        torch.manual_seed(seed)
        a = plain[0]["image"]
        torch.manual_seed(seed)
        b = faint[0]["image"]
        mean = a.mean(dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(b.mean(dim=(-2, -1), keepdim=True), mean, atol=1e-5, rtol=0)
        factor = float((b - mean).norm() / (a - mean).norm())
        torch.testing.assert_close(b, mean + factor * (a - mean), atol=1e-5, rtol=0)
        assert 1 / 16 - 1e-4 <= factor <= 0.5 + 1e-4
        factors.append(factor)
    assert max(factors) / min(factors) > 2
    torch.manual_seed(3)
    a = plain[0]["image"]
    torch.manual_seed(3)
    assert torch.equal(
        ImageFolderDataset(
            [path], mode="train", crop_size=32, augment=CropAugment(low_contrast_fraction=0.0)
        )[0]["image"],
        a,
    )
    assert torch.equal(
        ImageFolderDataset([path], mode="eval", augment=CropAugment(low_contrast_fraction=1.0))[0]["image"],
        load_image(path),
    )
    with pytest.raises(ValueError, match="low_contrast_fraction"):
        ImageFolderDataset([path], mode="train", augment=CropAugment(low_contrast_fraction=-0.1))
    with pytest.raises(ValueError, match="min_factor"):
        reduce_contrast(a, min_factor=0.0)
    with pytest.raises(ValueError, match="low_contrast_min"):
        ImageFolderDataset([path], mode="train", augment=CropAugment(low_contrast_min=0.75))
    # a lower floor reaches fainter crops, still through the data module's arguments
    dm = ImageFolderDataModule(
        train_dir=str(path.parent), crop_size=32, low_contrast_fraction=1.0, low_contrast_min=1 / 128
    )
    dm.setup("fit")
    torch.manual_seed(0)
    crops = [dm.datasets["train"][0]["image"] for _ in range(40)]
    amplitude = [float((c - c.mean(dim=(-2, -1), keepdim=True)).norm()) for c in crops]
    full = float((a - a.mean(dim=(-2, -1), keepdim=True)).norm())  # a plain crop of the same photo
    assert min(amplitude) < full / 32  # below the default floor of 1/16


# ------------------------------------------------------------------------------------------------------------
# exact resume


class _BatchRecorder(L.LightningModule):
    """Keeps every training batch by step and draws from torch's global RNG as a model's noise does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.batches: dict[int, tuple[list[str], torch.Tensor]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.batches[self.global_step + 1] = ([Path(p).name for p in batch["path"]], batch["image"].clone())
        torch.rand(3)  # the noise of a model
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # as tadm's LR schedules do: with max_epochs set, Lightning builds the loader before restoring loops
        assert self.trainer.estimated_stepping_batches == 8
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_resumed_fit_serves_the_uninterrupted_batches_crops_included(
    tmp_path: Path, one_thread: None
) -> None:
    """Lightning restores no RNG state: crops drawn from the global RNG, or an epoch order drawn from it,
    would differ after a resume. Each epoch's order is seed + epoch and each crop (flip, channel order,
    smooth field) comes from a generator of the sample's own, so a resume mid-epoch or at an epoch's end
    serves the uninterrupted run's batches, tensors and all, also when the training loader is built before
    Lightning restores its loops (``estimated_stepping_batches`` in ``configure_optimizers``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.shards import write_images

    write_images(tmp_path / "train", [(40, 48)] * 6)  # batch 2: 3 steps per epoch
    data = {"train_dir": str(tmp_path / "train"), "crop_size": 16, "batch_size": 2}
    data |= {"color_augment": True, "smooth_fraction": 0.3}

    def fit(name: str, ckpt: str | None = None) -> dict[int, tuple[list[str], torch.Tensor]]:
        L.seed_everything(3, verbose=False)
        torch.rand(7)  # a resumed run has used the global RNG differently before its first batch
        save = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=8, max_epochs=5, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[save], default_root_dir=tmp_path,
        )  # fmt: skip
        module = _BatchRecorder()
        trainer.fit(module, datamodule=ImageFolderDataModule(**data), ckpt_path=ckpt)
        return module.batches

    full = fit("a")
    assert sorted(full) == list(range(1, 9))
    assert {n for s in (4, 5, 6) for n in full[s][0]} == {p.name for p in (tmp_path / "train").iterdir()}
    assert [n for s in (1, 2, 3) for n in full[s][0]] != [n for s in (4, 5, 6) for n in full[s][0]]
    for ckpt, first in (("epoch=0-step=2.ckpt", 3), ("epoch=0-step=3.ckpt", 4), ("epoch=1-step=4.ckpt", 5)):
        resumed = fit(f"from-{first}", str(tmp_path / "a" / ckpt))
        assert sorted(resumed) == list(range(first, 9)), ckpt
        for step, (names, images) in resumed.items():
            assert names == full[step][0] and torch.equal(images, full[step][1]), f"{ckpt}: step {step}"
