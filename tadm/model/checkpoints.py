"""Read tadm checkpoints (Lightning ``.ckpt`` or exported ``.safetensors``) and export small ones.

A Lightning checkpoint of stage 2 holds the trained tensors in fp32 plus the optimiser's two
moments (3x their size) and loop state. ``tadm export`` keeps only what inference needs: the
trained tensors (already all a checkpoint stores, see ``TADMModule.on_save_checkpoint``) in
bf16/fp16, the rescaler in fp32 (its 8-bit LR image must come out bit for bit the same) and the
``tadm`` meta dict (backbone id, rescaler, stage, scale, run config) as JSON metadata. The file is a
plain safetensors file: no pickle, so loading it runs no code.

A run with ``model.ema_decay`` also stores the EMA of the trained tensors (``EMA_KEY``, see
:mod:`tadm.model.ema`). Readers take the EMA in place of the raw tensors when the checkpoint has one
(``weights="ema"``, the default) unless asked for ``weights="raw"``; the meta dict they return then
says which (``"weights"``), and an export records it, as it holds only one set.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tadm.errors import CheckpointError
from tadm.model.ema import check_ema_state
from tadm.ops.files import atomic_write

#: the Lightning checkpoint entry / safetensors metadata key that holds tadm's meta dict
META_KEY = "tadm"
#: the Lightning checkpoint entry that holds the EMA of the trained tensors (``TrainedEMA.state_dict``)
EMA_KEY = "tadm_ema"
#: which weights a reader returns: the EMA (when the checkpoint has one) or the raw trained tensors
WEIGHTS = ("ema", "raw")
EXPORT_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: tensors kept in float32 whatever the export dtype: the rescaler makes the stored LR image
FP32_PREFIXES = ("rescaler.",)


def _is_safetensors(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header (``{``)."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


#: what a tadm meta dict must hold, with the types it must have
META_FIELDS: dict[str, tuple[type, ...]] = {
    "backbone_id": (str,),
    "stage": (str,),
    "scale": (int,),
    "config": (str, type(None)),
}


def read_checkpoint(path: str | Path, weights: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The stored tensors and the ``tadm`` meta dict of a Lightning ``.ckpt`` or an exported file.

    ``weights``: ``None`` -- the EMA when the checkpoint has one, else the raw tensors; ``"ema"`` or
    ``"raw"`` -- that set, or a :class:`CheckpointError` when the file does not hold it. With an EMA in
    the file, the EMA tensors replace their raw counterparts (untrained ones, such as the frozen rescaler
    of stage 2, are raw in both) and ``meta["weights"]`` says which set came back.

    Loading never executes code: a ``.ckpt`` is unpickled with ``weights_only=True`` (tensors, numbers,
    strings and containers only), and a file that needs more is refused; an exported ``.safetensors``
    holds no pickle at all. Tensors come back as stored (an export's are bf16/fp16 except the
    rescaler's); loading them into a model casts them to its dtype. The format is told by the content,
    not the suffix. Anything malformed is a :class:`CheckpointError` naming the file.
    """
    if weights not in (None, *WEIGHTS):
        raise ValueError(f"unknown weights {weights!r}; choose from {', '.join(WEIGHTS)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{p}'")
    if _is_safetensors(p):
        state, meta = _read_safetensors(p)
        held = meta.get("weights", "raw")
        if weights is not None and weights != held:
            raise CheckpointError(
                f"'{p}' holds the {held} weights only; export the training checkpoint again with "
                f"--weights {weights}"
            )
    else:
        state, meta = _read_lightning(p, weights)
    bad = sorted(k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor))
    if bad:
        raise CheckpointError(f"'{p}': state entries {bad[:5]} are not named tensors")
    for key, types in META_FIELDS.items():
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool):
            raise CheckpointError(
                f"'{p}': its {META_KEY!r} meta dict has no valid {key!r} "
                f"(got {meta.get(key)!r}); the file is damaged or was not written by tadm"
            )
    return state, meta


def _read_safetensors(p: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:
        raise CheckpointError(f"'{p}' is not a readable safetensors file: {err}") from err
    if META_KEY not in metadata:
        raise CheckpointError(
            f"'{p}' is a safetensors file but not a tadm checkpoint (no {META_KEY!r} metadata); "
            "export one with `tadm export CKPT --output FILE`"
        )
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{p}': its {META_KEY!r} metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{p}': its {META_KEY!r} metadata is a {type(meta).__name__}, not a dict")
    return state, meta


def exported_weights(path: str | Path) -> str:
    """Which weights an exported ``.safetensors`` holds: ``ema`` or ``raw`` (from its metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return str((f.metadata() or {}).get("weights", "raw"))


def _unsafe_reason(err: Exception) -> str:
    """The line of torch's weights-only refusal that names the offending global."""
    lines = [line.strip() for line in str(err).splitlines()]
    hit = next((line for line in lines if "Unsupported global" in line), "")
    return (hit.split(": ", 1)[-1] if hit else lines[0] if lines else "unsafe pickle")[:200]


def _read_lightning(p: Path, weights: str | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not an unsafe pickle: not a pickle we can read at all
            raise CheckpointError(
                f"'{p}' is not a checkpoint (neither a Lightning .ckpt nor a safetensors file): "
                "an unreadable pickle"
            ) from err
        raise CheckpointError(
            f"refusing to load '{p}': it holds Python objects that loading would have to run code for "
            f"({_unsafe_reason(err)}); tadm checkpoints never do. If it is a tadm checkpoint you "
            "trust, re-save it with plain types, or share models as `tadm export` .safetensors files"
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"'{p}' is not a checkpoint (neither a Lightning .ckpt nor a safetensors file): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"'{p}' is a torch file but not a Lightning checkpoint (no 'state_dict')")
    if not isinstance(ckpt.get(META_KEY), dict):
        raise CheckpointError(
            f"'{p}' is a Lightning checkpoint but not a tadm one (no {META_KEY!r} entry: backbone id, "
            "stage, scale, config); it was not written by TADMModule"
        )
    state, meta = ckpt["state_dict"], ckpt[META_KEY]
    if EMA_KEY not in ckpt:
        if weights == "ema":
            raise CheckpointError(
                f"'{p}' has no EMA weights (trained without model.ema_decay); use --weights raw"
            )
        return state, meta
    ema = check_ema_state(ckpt[EMA_KEY], f"'{p}'")
    unknown = sorted(set(ema) - set(state))
    if unknown:
        raise CheckpointError(f"'{p}': its EMA holds tensors the checkpoint does not: {unknown[:5]}")
    if weights == "raw":
        return state, {**meta, "weights": "raw"}
    return {**state, **ema}, {**meta, "weights": "ema"}


def export_state(state: dict[str, Tensor], dtype: str = "bf16") -> dict[str, Tensor]:
    """The tensors an export stores: rescaler in fp32, other floating tensors in ``dtype``."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose from {', '.join(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        if t.is_floating_point():
            cast = t.float() if key.startswith(FP32_PREFIXES) else t.to(target)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{key!r} overflows {dtype} (max |x| = {t.abs().max().item():.3g})")
            t = cast
        out[key] = t.contiguous().clone()  # own storage: safetensors refuses shared tensors
    return out


def export_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "bf16", overwrite: bool = False, weights: str | None = None
) -> Path:
    """Write a weights-only ``.safetensors`` of ``src``'s trained tensors for inference; returns ``dst``.

    ``weights`` picks the EMA or the raw tensors (:func:`read_checkpoint`; default: the EMA when ``src``
    has one); the file's metadata records which (``weights``, also in the meta dict when ``src`` has an EMA).

    Written to a temporary file in ``dst``'s folder and renamed, so ``dst`` is never half-written.
    """
    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    if dst_p.suffix != ".safetensors":
        raise CheckpointError(f"export target '{dst_p}' must end in .safetensors")
    if dst_p.exists() and src_p.exists() and dst_p.resolve() == src_p.resolve():
        raise CheckpointError(f"export target '{dst_p}' is the source checkpoint itself")
    if dst_p.exists() and not overwrite:
        raise FileExistsError(
            f"export target '{dst_p}' exists; pass overwrite=True (--overwrite) to replace it"
        )
    state, meta = read_checkpoint(src_p, weights)
    tensors = export_state(state, dtype)
    try:
        meta_json = json.dumps(meta)
    except TypeError as err:
        raise CheckpointError(
            f"'{src_p}': its {META_KEY!r} meta dict is not JSON-serialisable: {err}"
        ) from err
    metadata = {
        META_KEY: meta_json,
        "export_dtype": dtype,
        "weights": meta.get("weights", "raw"),
        "format": "pt",
    }

    from safetensors.torch import save_file

    return atomic_write(dst_p, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
