"""The empty-prompt embedding as a small file, so a training node never loads T5-XXL.

A DiT backbone conditions every call on the embedding of the empty prompt. Computing it needs the text
encoders (T5-XXL alone is 4.7 B parameters, 19 GB in fp32) although the result is a few MB, so ``tadm
embed-prompt`` writes it once (:func:`write_prompt_embedding`) and the backbone's ``prompt_embedding:
FILE`` reads it instead of loading any text encoder.

Format: safetensors with ``prompt_embeds`` (1, L, D) and ``pooled_prompt_embeds`` (1, P), float32 as
computed, and string metadata: ``format`` (``tadm-prompt-embedding``), ``version``, ``family``,
``preset``, ``source`` (the weights' hub id / folder), ``backbone_id``, ``prompt`` (always empty),
``max_sequence_length`` and ``text_encoders`` (JSON: subfolder -> class).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from tadm.errors import ConfigError
from tadm.ops.files import atomic_write
from tadm.ops.safetensors_file import save_safetensors

FORMAT = "tadm-prompt-embedding"
VERSION = "1"
TENSORS = ("prompt_embeds", "pooled_prompt_embeds")
METADATA = ("family", "preset", "source", "backbone_id", "prompt", "max_sequence_length", "text_encoders")


def write_prompt_embedding(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write the two embeddings and their metadata atomically; tensors are stored exactly as given."""
    missing = [k for k in TENSORS if k not in tensors] + [k for k in METADATA if k not in metadata]
    if missing:
        raise ValueError(f"a prompt embedding needs {missing}")
    meta = {"format": FORMAT, "version": VERSION, **{k: str(v) for k, v in metadata.items()}}
    data = {k: tensors[k].detach().cpu().contiguous() for k in TENSORS}
    return atomic_write(path, lambda tmp: save_safetensors(data, tmp, meta))


def read_prompt_embedding(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a prompt-embedding file; any problem is a :class:`ConfigError` naming it."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"prompt embedding '{p}' not found; write it with `tadm embed-prompt --backbone CONFIG --output {p}`"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())  # noqa: SIM118 (not a dict)
            tensors = {k: f.get_tensor(k) for k in TENSORS if k in names}
    except Exception as err:
        raise ConfigError(f"prompt embedding '{p}' is not a readable safetensors file: {err}") from err
    if meta.get("format") != FORMAT:
        raise ConfigError(f"'{p}' is not a tadm prompt embedding (metadata format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ConfigError(
            f"prompt embedding '{p}' has version {meta.get('version')!r}; this tadm reads {VERSION}"
        )
    missing = [k for k in TENSORS if k not in tensors] + [k for k in METADATA if k not in meta]
    if missing:
        raise ConfigError(f"prompt embedding '{p}' lacks {missing}")
    emb, pooled = tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]
    if emb.ndim != 3 or pooled.ndim != 2 or emb.shape[0] != 1 or pooled.shape[0] != 1:
        raise ConfigError(
            f"prompt embedding '{p}': expected prompt_embeds (1,L,D) and pooled_prompt_embeds (1,P), got "
            f"{tuple(emb.shape)} and {tuple(pooled.shape)}"
        )
    if not (torch.isfinite(emb).all() and torch.isfinite(pooled).all()):
        raise ConfigError(f"prompt embedding '{p}' holds non-finite values")
    return tensors, meta


def text_encoders_json(classes: dict[str, str]) -> str:
    """The ``text_encoders`` metadata value: subfolder -> class name, as JSON (stable order)."""
    return json.dumps(dict(sorted(classes.items())))
