"""Writing ``.safetensors`` files whose bytes depend only on what they hold.

safetensors (0.8) serialises ``__metadata__`` from a Rust ``HashMap``, so two saves of the same tensors and
metadata write its keys in a random order (safetensors issue #584): the weights are identical, the file's
checksum is not. ``make shipped-model`` promises the same bytes for the same torch and thread count, so
every tadm export rewrites the header with its metadata keys sorted (what safetensors' own open fix, PR
#790, does); readers see the same metadata either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

#: the 8-byte little-endian header length that starts every safetensors file
_LEN = 8


def save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file`` with the header made canonical (:func:`sort_metadata`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    sort_metadata(path)


def sort_metadata(path: str | os.PathLike[str]) -> None:
    """Rewrite ``path``'s header in place with its ``__metadata__`` keys sorted, the tensor entries in the
    order safetensors wrote them (sorted by it already), padded with spaces to the header's length."""
    p = Path(path)
    with p.open("r+b") as f:
        n = int.from_bytes(f.read(_LEN), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        canonical = {"__metadata__": dict(sorted(meta.items())), **header}
        raw = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > n:  # JSON escapes differ from serde_json's: never for tadm's metadata, but stay correct
            raise ValueError(f"'{p}': the sorted safetensors header is {len(raw)} bytes, longer than {n}")
        f.seek(_LEN)
        f.write(raw + b" " * (n - len(raw)))
