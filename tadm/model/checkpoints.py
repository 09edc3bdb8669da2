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

import io
import json
import pickle
import re
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from tadm.config.build import parse_run_config
from tadm.errors import CheckpointError
from tadm.model.ema import check_ema_state
from tadm.ops.files import atomic_write
from tadm.ops.safetensors_file import save_safetensors

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
    not the suffix. Anything malformed (the stored run config included, :func:`parse_run_config`) is a
    :class:`CheckpointError` naming the file.
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
    if meta["config"] is not None:  # every reader rebuilds the model from it: its shape is checked here
        parse_run_config(meta["config"], str(p))
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


#: how torch's weights-only unpickler (torch 2.x) names what it refused: a global outside its allow-list, a
#: global of a module it blocks outright (``os``, ``posix``, ``nt``, ``sys``), a call of a function it does
#: not know
_REFUSAL_PATTERNS = (
    re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs to |$)", re.MULTILINE),
)
#: the globals torch's weights-only unpickler allows besides ``torch.*`` (its ``_get_allowed_globals``)
_PLAIN_GLOBALS = frozenset(
    {
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
    }
)
#: a global's name as Python writes it (random bytes parsed as a pickle make up others)
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
#: the pickle opcodes that push a string (their argument)
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
#: the pickle opcodes that neither push nor pop anything a later ``STACK_GLOBAL`` reads
_NEUTRAL_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})


def refused_object(err: BaseException, path: str | Path | None = None) -> str | None:
    """The Python object torch's weights-only unpickler refused to load, as the pickle names it
    (``posix.system``, ``eval``, ``argparse.Namespace``); None when ``err`` is no such refusal.

    The one place that reads torch's refusals, for every reader of a pickle (checkpoints, release files,
    ``--ckpt_path``). torch words them in several ways (see ``_REFUSAL_PATTERNS``); a pickle of protocol 4
    or newer it refuses before reading any name (``Unsupported operand 149``), so then the names come from
    ``path``'s pickle itself, read opcode by opcode without running anything.
    """
    text = str(err)
    for pattern in _REFUSAL_PATTERNS:
        hit = pattern.search(text)
        if hit:
            return _python3_name(hit.group(1).strip())[:200]
    if path is not None and "Unsupported operand" in text:
        names = [
            _python3_name(n)
            for n in _pickle_globals(Path(path))
            if _DOTTED_NAME.fullmatch(n) and n.split(".")[0] != "torch" and n not in _PLAIN_GLOBALS
        ]
        if names:
            return ", ".join(dict.fromkeys(names))[:200]
    return None


def _python3_name(name: str) -> str:
    """A global as Python's unpickler would import it: a protocol-2 pickle names some by their Python 2
    module (``commands.Popen`` is ``subprocess.Popen``); torch maps only its own."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[(module, attr)])
    return (
        f"{_compat_pickle.IMPORT_MAPPING[module]}.{attr}" if module in _compat_pickle.IMPORT_MAPPING else name
    )


def _pickle_globals(path: Path, most: int = 8) -> list[str]:
    """The globals (``module.name``) the pickles in ``path`` import, read with :mod:`pickletools` (which
    parses, never runs): ``data.pkl`` of a torch zip file, else the file's first ``most`` pickles."""
    import pickletools
    import zipfile

    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return names
                stream: IO[bytes] = io.BytesIO(z.read(member))
        else:
            stream = path.open("rb")
        with stream:
            for _ in range(most):
                recent: list[str | None] = []  # the values of the last two pushes (None: not a string)
                memo: dict[int, str | None] = {}
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(recent) == 2 and None not in recent:
                        names.append(f"{recent[0]}.{recent[1]}")
                    if op.name == "MEMOIZE":
                        memo[len(memo)] = recent[-1] if recent else None
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = recent[-1] if recent else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        recent = [*recent, memo.get(int(arg))][-2:]
                    elif op.name not in _NEUTRAL_OPS:
                        value = arg if op.name in _STRING_OPS and isinstance(arg, str) else None
                        recent = [*recent, value][-2:]
    except Exception:  # not (or no longer) a pickle: what was read so far is all there is
        pass
    return names


def load_weights_only(path: str | Path, what: str, advice: str, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of ``path``: tensors, numbers, strings and containers only.

    A file whose unpickling would run code (any other Python object: ``posix.system``, a class) is refused
    without running anything, naming the object (:func:`refused_object`) and ending with ``advice``; a file
    torch cannot read at all is "not ``what``". Both are a one-line :class:`CheckpointError` naming the
    file. ``mmap``: map a zip-format file's tensors instead of reading them (an older, non-zip torch file
    cannot be mapped and is read).
    """
    import warnings
    import zipfile

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: '{p}'")
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol it cannot read: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(p))
    except pickle.UnpicklingError as err:
        obj = refused_object(err, p)
        if obj is None:
            raise CheckpointError(
                f"'{p}' is not {what}: an unreadable pickle ({_torch_reason(err)})"
            ) from err
        raise CheckpointError(
            f"refusing to load '{p}': it holds {obj}, a Python object that unpickling would run code for "
            f"(nothing was run: tadm reads only tensors, numbers, strings and containers from a pickle). {advice}"
        ) from err
    except Exception as err:
        raise CheckpointError(f"'{p}' is not {what}: {type(err).__name__}: {_torch_reason(err)}") from err


def _torch_reason(err: BaseException) -> str:
    """The line of a torch error that says what went wrong (not the weights-only boilerplate around it)."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(err).splitlines()]
    boiler = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
    reason = next((line for line in lines if line and not line.startswith(boiler)), "")
    return reason[:200] or type(err).__name__


def load_lightning_file(path: str | Path, mmap: bool = False) -> Any:
    """A Lightning ``.ckpt`` as torch unpickles it, read without running code (:func:`load_weights_only`):
    what every reader of one (``--ckpt_path``, ``--ckpt``, ``model.init_from``, ``tadm export``) loads."""
    return load_weights_only(
        path,
        "a checkpoint (neither a Lightning .ckpt nor a safetensors file)",
        "tadm checkpoints never hold such objects; if it is a tadm checkpoint you trust, re-save it with "
        "plain types, or share models as `tadm export` .safetensors files",
        mmap=mmap,
    )


def _read_lightning(p: Path, weights: str | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    ckpt = load_lightning_file(p)
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

    return atomic_write(dst_p, lambda tmp: save_safetensors(tensors, tmp, metadata))
