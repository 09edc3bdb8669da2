"""Image folders and WebDataset shard sets for the data tests."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from tadm.datamodules.shard_writer import pack_shards
from tadm.datamodules.shards import new_index, write_index


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Smooth-ish random RGB images, alternating PNG and JPEG, named img_000.png, img_001.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        path = folder / f"img_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
        im.save(path)
        paths.append(path)
    return paths


def write_shards(
    root: Path, counts: list[int], size: tuple[int, int] = (40, 48), seed: int = 0, **pack: Any
) -> Path:
    """Shards with the given sample counts (via ``tadm shard``, one source folder per shard)."""
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, n in enumerate(counts):
        src = root / f"src{s}"
        write_images(src, [size] * n, seed=seed + s)
        for i, p in enumerate(sorted(src.iterdir())):
            p.rename(src / f"s{s}_{i:03d}{p.suffix}")
        index = pack_shards(src, root / f"tmp{s}", maxcount=10**6, **pack)
        (root / f"tmp{s}" / "shard-000000.tar").rename(out / f"shard-{s:06d}.tar")
        entry = {**index["shards"][0], "name": f"shard-{s:06d}.tar"}
        shards.append(entry)
        latents = index["latents"]
    write_index(out, new_index(shards, latents=latents))
    return out


def all_keys(root: Path) -> set[str]:
    return {k for p in sorted(root.glob("*.tar")) for k in tar_keys(p)}


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def keys_of(stream: Any, batch_size: int = 1, num_workers: int = 0) -> list[str]:
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers)
    return [k for batch in loader for k in batch["key"]]
