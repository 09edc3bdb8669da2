"""`tadm shard`: byte-exact round trip, keys, index, shard limits, atomic and resumable writes, bad input,
cached latents of fixed crops."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tadm.commands.main import main
from tadm.commands.shard import parse_size
from tadm.config.build import build_backbone
from tadm.datamodules.image_io import load_image
from tadm.datamodules.image_transforms import reflect_pad
from tadm.datamodules.shard_writer import STATE_NAME, pack_shards, sample_keys
from tadm.errors import ShardError
from tadm.testing.twins import write_twin_config
from tests.helpers import REPO
from tests.helpers.shards import write_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} over every shard of an output folder."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        for name, data in _members(shard).items():
            key, _, field = name.partition(".")
            samples.setdefault(key, {})[field] = data
    return samples


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Seven images in nested folders, with upper-case suffixes, dots and spaces in names."""
    src = tmp_path / "photos"
    paths = write_images(src, [(30 + 4 * i, 40) for i in range(5)])
    (src / "sub dir").mkdir()
    paths[0].rename(src / "sub dir" / "holiday.2024 v2.PNG")
    paths[1].rename(src / "sub dir" / "img_001.JPEG")
    (src / "img_002.jpg").write_bytes(paths[3].read_bytes())  # img_002.png and img_002.jpg share a stem
    return src


def test_round_trip_keeps_original_bytes_with_one_key_per_sample(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["shard", str(photos), str(out), "--maxcount", "2", "--quiet"]) == 0
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    samples = _samples(out)
    assert len(samples) == len(files) == 6
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    for path in files:
        rel = path.relative_to(photos).as_posix()
        sample = by_path[rel]
        image_fields = [f for f in sample if f != "json"]
        assert image_fields == [path.suffix.lower()[1:]]
        assert sample[image_fields[0]] == path.read_bytes(), f"{rel} was re-encoded"
        meta = json.loads(sample["json"])
        assert (meta["height"], meta["width"]) == tuple(load_image(path).shape[1:])
    assert {"sub_dir/holiday_2024_v2", "img_002", "img_002_2"} <= set(samples)  # WebDataset-safe, unique
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 6 and [s["count"] for s in index["shards"]] == [2, 2, 2]
    assert [s["size"] for s in index["shards"]] == [(out / s["name"]).stat().st_size for s in index["shards"]]
    assert index["size"] == sum(s["size"] for s in index["shards"])
    assert not list(out.glob(".*")), "no partial or state file is left behind"


def test_maxsize_closes_shards_before_they_grow_past_it(photos: Path, tmp_path: Path) -> None:
    largest = max(p.stat().st_size for p in photos.rglob("*") if p.is_file())
    limit = 3 * largest + 8 * 512
    index = pack_shards(photos, tmp_path / "out", maxsize=limit)
    assert len(index["shards"]) > 1
    assert all(s["size"] <= limit + 10240 for s in index["shards"])  # + the tar's end-of-archive record
    assert sum(s["count"] for s in index["shards"]) == 6


def test_interrupted_run_leaves_only_complete_shards_and_resumes_to_the_same_result(
    photos: Path, tmp_path: Path
) -> None:
    reference = pack_shards(photos, tmp_path / "ref", maxcount=2)

    def interrupt_after_five(done: int, total: int) -> None:
        if done == 5:  # the fifth image is in the third shard, not yet finished
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack_shards(photos, out, maxcount=2, progress=interrupt_after_five)
    # two finished shards, each a valid tar of 2 samples; the third (half written) is nowhere
    assert sorted(p.name for p in out.iterdir()) == [STATE_NAME, "shard-000000.tar", "shard-000001.tar"]
    assert all(len(_members(out / f"shard-00000{i}.tar")) == 4 for i in (0, 1))

    resumed = pack_shards(photos, out, maxcount=2)
    assert resumed["shards"] == reference["shards"]
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()
    assert not (out / STATE_NAME).exists()
    # a finished run is left alone; other options need --overwrite
    assert pack_shards(photos, out, maxcount=2)["created"] == resumed["created"]
    with pytest.raises(ShardError, match="other images or options.*--overwrite"):
        pack_shards(photos, out, maxcount=3)
    assert pack_shards(photos, out, maxcount=3, overwrite=True)["count"] == 6


def test_bad_input_gets_an_error_naming_the_file(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ShardError, match=r"image folder '.*missing' does not exist"):
        pack_shards(tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"image folder '.*empty' holds no images"):
        pack_shards(tmp_path / "empty", tmp_path / "o2")
    bad = photos / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is no png")
    assert main(["shard", str(photos), str(tmp_path / "o3"), "--quiet"]) == 2  # unusable: nothing packed
    assert "zz_broken.png" in capsys.readouterr().err
    assert not list((tmp_path / "o3").glob("*.tar")), "a failed run leaves no shard behind"
    with pytest.warns(UserWarning, match="zz_broken.png"):
        index = pack_shards(photos, tmp_path / "o4", on_bad_image="skip")
    assert index["count"] == 6 and [s["path"] for s in index["skipped"]] == ["zz_broken.png"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="already holds.*not made by this command"):
        pack_shards(photos, tmp_path / "other", on_bad_image="skip")


def test_help_and_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--maxcount" in text and "--latents" in text and "--crops-per-image" in text
    assert [parse_size(s) for s in ("1000", "1e9", "500MB", "1G", "2GiB", "64kb")] == [
        1000,
        10**9,
        500 * 10**6,
        10**9,
        2 * 2**30,
        64000,
    ]
    assert sample_keys(["a.b/c d.png", "a.b/c d.jpg", "x/__y__.png"]) == ["a_b/c_d", "a_b/c_d_2", "x/y"]


def test_latents_of_fixed_crops_from_a_composed_config(photos: Path, tmp_path: Path) -> None:
    """--latents builds model.backbone of an experiment (+ a backbone file + an override), nothing else."""
    exp = REPO / "configs" / "experiments" / "rescaler_x16.yaml"
    sdxl = REPO / "configs" / "backbone" / "sdxl.yaml"
    twin = write_twin_config("tiny-sdxl", tmp_path / "twin.yaml")
    args = [
        "--latents",
        str(exp),
        str(sdxl),
        str(twin),
        "--backbone-arg",
        "sample_latent=false",
        "--crop",
        "32",
    ]
    out = tmp_path / "out"
    assert (
        main(["shard", str(photos), str(out), *args, "--crops-per-image", "3", "--quiet", "--device", "cpu"])
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    backbone = build_backbone([str(exp), str(sdxl), str(twin)], ["sample_latent=false"])
    backbone.load_for_stage("rescaler")
    latents = index["latents"]
    assert latents["backbone_id"] == backbone.backbone_id == "stable_diffusion:tiny-sdxl:random-seed3000"
    assert latents["shape"] == [4, 4, 4] and latents["flips"] is True and latents["crop"] == 32
    files = {p.relative_to(photos).as_posix(): p for p in photos.rglob("*") if p.is_file()}
    for sample in _samples(out).values():
        meta = json.loads(sample["json"])
        z = np.load(io.BytesIO(sample["latents.npy"]))
        assert z.dtype == np.float16 and z.shape == (3, 2, 4, 4, 4)
        image = reflect_pad(load_image(files[meta["path"]]), 32, 32)
        boxes: list[Any] = meta["latents"]["boxes"]
        crops = torch.stack([image[:, t : t + 32, left : left + 32] for t, left in boxes])
        with torch.no_grad():
            expected = torch.stack([backbone.encode(crops), backbone.encode(crops.flip(-1))], dim=1)
        torch.testing.assert_close(torch.from_numpy(z).float(), expected, atol=2e-3, rtol=2e-3)
    # deterministic crop positions: a second run stores the same boxes and latents
    again = tmp_path / "again"
    assert main(["shard", str(photos), str(again), *args, "--crops-per-image", "3", "--quiet"]) == 0
    assert _samples(again) == _samples(out)


def test_latent_options_are_checked(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quick = str(REPO / "configs" / "quickstart.yaml")
    assert (
        main(["shard", str(photos), str(tmp_path / "o"), "--latents", quick, "--crop", "36", "--quiet"]) == 2
    )
    assert "--crop 36 is not a multiple of the backbone's downsampling 8" in capsys.readouterr().err
    assert main(["shard", str(photos), str(tmp_path / "o"), "--latents", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    assert main(["shard", str(photos), str(tmp_path / "o"), "--backbone-arg", "preset=x"]) == 2
    assert "--backbone-arg needs --latents" in capsys.readouterr().err
