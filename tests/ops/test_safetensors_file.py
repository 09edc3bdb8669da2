"""save_safetensors: the same tensors and metadata give the same bytes, which safetensors alone does not
promise (its metadata map is written in a random order)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tadm.ops.safetensors_file import save_safetensors, sort_metadata

TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(4, dtype=torch.float16)}
#: enough keys that a random order repeating itself by chance is negligible
METADATA = {f"key{i}": f"value {i} ü" for i in (7, 3, 9, 1, 5, 0, 8, 2)} | {"format": "pt"}


def _header(path: Path) -> tuple[int, str]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, raw[8 : 8 + n].decode("utf-8")


def test_the_same_content_gives_the_same_bytes_with_sorted_metadata(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.safetensors" for i in range(5)]
    for p in paths:
        save_safetensors(TENSORS, p, METADATA)
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    n, text = _header(paths[0])
    assert n % 8 == 0 and text.startswith('{"__metadata__":')
    header = json.loads(text)
    assert list(header["__metadata__"]) == sorted(METADATA)
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == METADATA
        for k, v in TENSORS.items():
            assert torch.equal(f.get_tensor(k), v)


def test_sorting_is_idempotent_and_leaves_files_without_metadata_alone(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_safetensors(TENSORS, p, METADATA)
    before = p.read_bytes()
    sort_metadata(p)
    assert p.read_bytes() == before
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(TENSORS, str(bare))
    raw = bare.read_bytes()
    sort_metadata(bare)
    assert bare.read_bytes() == raw
