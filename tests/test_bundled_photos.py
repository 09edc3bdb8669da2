"""The bundled large photographs (assets/photos): every file has its source and licence recorded, the held-out
set is what a quality claim needs (>= 20 photos of >= 2 MP), and no held-out photo is trained on."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import CONFIGS, REPO, load_script

PHOTOS = REPO / "assets" / "photos"
LICENCES = {"CC0-1.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "GPL-2+", "LGPL-3"}


def files(split: str) -> list[Path]:
    return sorted((PHOTOS / split).glob("*.jpg"))


def licence_rows() -> dict[str, list[str]]:
    """``split/file`` -> its LICENSES.md table row's cells."""
    rows: dict[str, list[str]] = {}
    split = None
    for line in (PHOTOS / "LICENSES.md").read_text().splitlines():
        if m := re.match(r"## (\w+)/$", line):
            split = m.group(1)
        elif split and line.startswith("| ") and line.split("|")[1].strip().endswith(".jpg"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[f"{split}/{cells[0]}"] = cells
    return rows


def test_every_photo_has_its_source_author_and_licence() -> None:
    rows = licence_rows()
    on_disk = {f"{p.parent.name}/{p.name}" for split in ("heldout", "train") for p in files(split)}
    assert set(rows) == on_disk
    for name, cells in rows.items():
        size, source, author, licence = cells[1], cells[3], cells[4], cells[5]
        assert licence in LICENCES, (name, licence)
        assert author and "usr/share" in source, name
        w, h = Image.open(PHOTOS / name).size
        assert size == f"{w}x{h}", name


def test_prepare_script_lists_exactly_the_bundled_files() -> None:
    module = load_script(PHOTOS / "prepare.py")
    listed = {f"{split}/{name}.jpg" for name, split, _, _ in module.PHOTOS}
    assert listed == {f"{p.parent.name}/{p.name}" for split in ("heldout", "train") for p in files(split)}


def test_the_held_out_set_is_large_enough_for_a_quality_claim() -> None:
    held = files("heldout")
    assert len(held) >= 20
    for path in held:
        w, h = Image.open(path).size
        assert w * h >= 2_000_000, (path.name, w, h)


def test_no_held_out_photo_is_in_any_training_folder() -> None:
    def digest(path: Path) -> str:
        return hashlib.sha256(Image.open(path).convert("RGB").resize((32, 32)).tobytes()).hexdigest()

    held = {digest(p): p.name for p in files("heldout")}
    for folder in (PHOTOS / "train", REPO / "assets" / "samples" / "train"):
        for path in sorted(folder.iterdir()):
            assert digest(path) not in held, (path, held.get(digest(path)))
    assert (
        len({p.stem.split("_")[0] for p in files("heldout")}) > 10
    )  # varied subjects, not one photo cropped


@pytest.mark.parametrize("config", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_no_config_trains_on_the_held_out_photos(config: str) -> None:
    """Every config file, the shipped model's phases and studies included (a new one is covered by itself)."""
    text = (CONFIGS / config).read_text()
    for line in text.splitlines():
        if "train_dir" in line:
            assert "heldout" not in line, line
    yaml.safe_load(text)  # and it is valid YAML
