"""Pack a folder of images into WebDataset tar shards, optionally with cached latents.

Each image becomes one sample: its original file bytes (no re-encoding) under its own extension, plus a
``.json`` with the source path and size, keyed by its sanitised relative path. ``OUT/index.json`` lists the
shards with their sample counts and byte sizes; ``WebDatasetDataModule`` reads it to size epochs and to give
every rank the same number of validation batches.

``--latents CONFIG`` also stores, per image, the frozen VAE's latents (fp16) of ``--crops-per-image`` fixed
``--crop`` crops at deterministic positions, and of their horizontal flips, so stage-1 training can skip the
encoder. The crops themselves are not stored: the data module cuts the same boxes from the original bytes,
bit for bit the pixels that were encoded.

Writes are atomic: a shard is written to a hidden ``.partial`` file and renamed when complete, and a state
file records finished shards, so an interrupted run resumes where it stopped (rerun the same command) and
never leaves a half-written shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from tadm.datamodules.image_io import ImageReadError, image_size, list_images, load_image
from tadm.datamodules.shards import (
    INDEX_NAME,
    INDEX_VERSION,
    LATENT_FIELD,
    META_FIELD,
    new_index,
    read_index,
    write_index,
)
from tadm.errors import ShardError
from tadm.ops.files import atomic_write_text

#: the writer's own bookkeeping while a run is unfinished (hidden; readers never look at it)
STATE_NAME = ".tadm-shard-state.json"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class LatentOptions:
    """What ``--latents`` caches: a backbone and the fixed crops whose latents are stored.

    Attributes:
        backbone: The frozen backbone (built from ``--latents`` configs by :func:`build_backbone`).
        crop: Side of the square crops (the training ``crop_size``).
        crops_per_image: Fixed crops per image.
        flips: Also store the latents of the horizontally flipped crops (lets training keep random flips).
        seed: Seeds the crop positions, with each image's relative path.
        device: Where to encode (``cpu``, ``cuda``, ...).
        batch_size: Crops encoded per forward pass.
        config: Description of where the backbone came from (stored in the index).
    """

    backbone: Any
    crop: int = 512
    crops_per_image: int = 4
    flips: bool = True
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    config: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# helpers


def sample_keys(relpaths: Sequence[str]) -> list[str]:
    """One unique WebDataset key per relative path: the path without extension, made tar- and key-safe.

    WebDataset splits a member name at the first dot of its file name, so dots (and anything outside
    ``[A-Za-z0-9_-]``) become ``_``; collisions (``a.png`` and ``a.jpg``) get ``_2``, ``_3``, ... The
    original path is kept in the sample's ``.json``.
    """
    keys: list[str] = []
    used: set[str] = set()
    for rel in relpaths:
        parts = list(PurePosixPath(rel).with_suffix("").parts)
        clean = "/".join(re.sub(r"[^A-Za-z0-9_-]", "_", p).strip("_") or "_" for p in parts)
        key, n = clean, 1
        while key in used:
            n += 1
            key = f"{clean}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def crop_boxes(height: int, width: int, crop: int, count: int, seed: int, relpath: str) -> list[list[int]]:
    """``count`` deterministic ``[top, left]`` crop positions in the image mirror-padded to ``crop``."""
    h, w = max(height, crop), max(width, crop)
    rng = np.random.default_rng([seed, zlib.crc32(relpath.encode("utf-8"))])
    return [[int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))] for _ in range(count)]


def _tar_size(fields: dict[str, bytes], key: str) -> int:
    """Bytes a sample adds to a tar: a header (plus a PAX header for long names) and padded data per field."""
    total = 0
    for ext, data in fields.items():
        name = f"{key}.{ext}"
        total += _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
        if len(name.encode("utf-8")) > 99 or not name.isascii():
            total += 3 * _TAR_BLOCK
    return total


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot read '{path}': {exc}; pass --overwrite to start over") from exc
    if not isinstance(data, dict):
        raise ShardError(f"'{path}' is not a tadm shard state file; pass --overwrite to start over")
    return data


# --------------------------------------------------------------------------------------------------------
# writing


class _PartialShard:
    """A tar shard being written under a hidden name; :meth:`finish` makes it visible atomically."""

    def __init__(self, folder: Path, name: str) -> None:
        import webdataset as wds

        self.final = folder / name
        self.partial = folder / f".{name}.partial"
        self.file = open(self.partial, "wb")  # noqa: SIM115 -- closed by finish() or abort()
        # PAX: long and non-ASCII member names; fixed mtime: the same input gives byte-identical shards
        self.tar = wds.TarWriter(
            self.file, encoder=False, format="PAX_FORMAT", mtime=0, user="tadm", group="tadm"
        )
        self.count = 0
        self.size = 2 * _TAR_BLOCK  # end-of-archive blocks

    def write(self, key: str, fields: dict[str, bytes], size: int) -> None:
        self.tar.write({"__key__": key, **fields})
        self.count += 1
        self.size += size

    def finish(self) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.final)
        return {"name": self.final.name, "count": self.count, "size": self.final.stat().st_size}

    def abort(self) -> None:
        try:
            try:
                self.tar.close()  # flushes into the partial file, which is deleted below
            finally:
                self.file.close()
        finally:
            self.partial.unlink(missing_ok=True)


@dataclass
class _Packer:
    """One run of the shard command (see :func:`pack_shards` for the arguments)."""

    src: Path
    out: Path
    maxcount: int
    maxsize: int
    prefix: str
    on_bad_image: Literal["error", "skip"]
    check: Literal["header", "decode"]
    latents: LatentOptions | None
    say: Callable[[str], None]
    progress: Callable[[int, int], None]

    def __post_init__(self) -> None:
        self.files = list_images(self.src)
        self.relpaths = [f.relative_to(self.src).as_posix() for f in self.files]
        self.keys = sample_keys(self.relpaths)
        self.latent_info: dict[str, Any] | None = None
        if self.latents is not None:
            bb = self.latents.backbone
            self.latent_info = {
                "backbone_id": bb.backbone_id,
                "config": self.latents.config,
                "crop": self.latents.crop,
                "crops_per_image": self.latents.crops_per_image,
                "flips": self.latents.flips,
                "seed": self.latents.seed,
                "shape": [
                    int(bb.latent_channels),
                    self.latents.crop // int(bb.downsample_factor),
                    self.latents.crop // int(bb.downsample_factor),
                ],
                "dtype": "float16",
                "layout": "(crops, flips, C, h, w); flips index 0 = as cropped, 1 = horizontally flipped",
            }
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        options = {
            "version": INDEX_VERSION,
            "src": str(self.src.resolve()),
            "maxcount": self.maxcount,
            "maxsize": self.maxsize,
            "prefix": self.prefix,
            "on_bad_image": self.on_bad_image,
            "check": self.check,
            # where the backbone came from is its id; how the config files were spelled does not matter
            "latents": {k: v for k, v in self.latent_info.items() if k != "config"}
            if self.latent_info
            else None,
        }
        h.update(json.dumps(options, sort_keys=True).encode())
        for path, rel in zip(self.files, self.relpaths, strict=True):
            st = path.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- resume / overwrite
    def _ours(self) -> list[Path]:
        pattern = re.compile(rf"^\.?{re.escape(self.prefix)}-\d{{6}}\.tar(\.partial)?$")
        names = [p for p in self.out.iterdir() if pattern.match(p.name)]
        return sorted(names + [p for p in (self.out / INDEX_NAME, self.out / STATE_NAME) if p.exists()])

    def _start(
        self, overwrite: bool
    ) -> tuple[int, list[dict[str, Any]], list[dict[str, str]]] | dict[str, Any]:
        """Where to begin: (next file, finished shards, skipped files), or the index of a finished run."""
        if self.out.exists() and not self.out.is_dir():
            raise ShardError(f"output '{self.out}' exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in self._ours():
                path.unlink()
        index_path, state_path = self.out / INDEX_NAME, self.out / STATE_NAME
        if index_path.exists():
            try:
                index = read_index(index_path)
            except ValueError as exc:
                raise ShardError(f"{exc}; pass --overwrite to start over") from exc
            if index.get("fingerprint") == self.fingerprint and self._intact(index["shards"]):
                return index
            raise ShardError(
                f"'{self.out}' already holds a shard set ({index_path}) made from other images or options; "
                "pass --overwrite to replace it, or choose another output folder"
            )
        for stale in self.out.glob(f".{self.prefix}-*.tar.partial"):
            stale.unlink()  # an interrupted shard: never complete, never visible
        if state_path.exists():
            state = _read_json(state_path)
            if state.get("fingerprint") != self.fingerprint:
                raise ShardError(
                    f"'{self.out}' holds an interrupted run with other images or options ({state_path}); "
                    "pass --overwrite to start over"
                )
            if not self._intact(state["shards"]):
                raise ShardError(f"shards listed in {state_path} are missing or changed; pass --overwrite")
            return int(state["next"]), list(state["shards"]), list(state["skipped"])
        leftovers = [p.name for p in self._ours()]
        if leftovers:
            raise ShardError(
                f"'{self.out}' already holds {leftovers[:3]} not made by this command's run; "
                "pass --overwrite to replace them, or choose another output folder"
            )
        return 0, [], []

    def _intact(self, shards: list[dict[str, Any]]) -> bool:
        return all(
            (self.out / s["name"]).is_file() and (self.out / s["name"]).stat().st_size == s["size"]
            for s in shards
        )

    # ---------------------------------------------------------------- samples
    def _sample(self, i: int) -> dict[str, bytes]:
        path, rel = self.files[i], self.relpaths[i]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
        height, width = image_size(path)
        meta: dict[str, Any] = {"path": rel, "height": height, "width": width}
        fields = {path.suffix.lower().lstrip("."): data}
        if self.latents is not None:
            image = load_image(path)
            latents, boxes = self._encode(image, i)
            meta["latents"] = {"crop": self.latents.crop, "boxes": boxes, "flips": self.latents.flips}
            buf = io.BytesIO()
            np.save(buf, latents, allow_pickle=False)
            fields[LATENT_FIELD] = buf.getvalue()
        elif self.check == "decode":
            load_image(path)
        fields[META_FIELD] = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        return fields

    def _encode(self, image: Any, i: int) -> tuple[np.ndarray, list[list[int]]]:
        import torch

        from tadm.datamodules.image_transforms import reflect_pad

        opts = self.latents
        assert opts is not None
        c = opts.crop
        padded = reflect_pad(image, c, c)
        rel = self.relpaths[i]
        boxes = crop_boxes(int(image.shape[1]), int(image.shape[2]), c, opts.crops_per_image, opts.seed, rel)
        crops = torch.stack([padded[:, top : top + c, left : left + c] for top, left in boxes])
        if opts.flips:
            crops = torch.cat([crops, crops.flip(-1)])
        out = []
        with torch.no_grad():
            for start in range(0, len(crops), opts.batch_size):
                batch = crops[start : start + opts.batch_size].to(opts.device)
                out.append(opts.backbone.encode(batch).float().cpu())
        z = torch.cat(out)
        if not torch.isfinite(z).all() or z.abs().max() > _FP16_MAX:
            raise ShardError(f"the backbone's latents of '{self.files[i]}' are not finite or overflow fp16")
        flips = 2 if opts.flips else 1
        z = z.reshape(flips, len(boxes), *z.shape[1:]).transpose(0, 1)
        return np.ascontiguousarray(z.numpy().astype(np.float16)), boxes

    # ---------------------------------------------------------------- run
    def run(self, overwrite: bool) -> dict[str, Any]:
        start = self._start(overwrite)
        if isinstance(start, dict):
            self._say(
                f"'{self.out}' is already complete: {start['count']} samples in {len(start['shards'])} shard(s)"
            )
            return start
        first, shards, skipped = start
        if first:
            self._say(
                f"resuming after {len(shards)} finished shard(s), at image {first + 1}/{len(self.files)}"
            )
        total = len(self.files)
        self.progress(first, total)
        writer: _PartialShard | None = None
        try:
            for i in range(first, len(self.files)):
                try:
                    fields = self._sample(i)
                except ImageReadError as exc:
                    if self.on_bad_image == "error":
                        raise ShardError(f"{exc} (pass --on-bad-image skip to leave such files out)") from exc
                    skipped.append({"path": self.relpaths[i], "error": str(exc)})
                    warnings.warn(f"skipping {exc}", stacklevel=2)
                    self.progress(i + 1, total)
                    continue
                size = _tar_size(fields, self.keys[i])
                if writer is not None and (
                    writer.count >= self.maxcount or writer.size + size > self.maxsize
                ):
                    shards.append(writer.finish())
                    writer = None
                    self._save_state(i, shards, skipped)
                if writer is None:
                    writer = _PartialShard(self.out, f"{self.prefix}-{len(shards):06d}.tar")
                writer.write(self.keys[i], fields, size)
                self.progress(i + 1, total)
            if writer is not None:
                shards.append(writer.finish())
                writer = None
        finally:
            if writer is not None:
                writer.abort()
        if not shards:
            raise ShardError(f"no readable images in '{self.src}' ({len(skipped)} skipped)")
        index = new_index(
            shards,
            source=str(self.src.resolve()),
            skipped=skipped,
            latents=self.latent_info,
            options={"maxcount": self.maxcount, "maxsize": self.maxsize, "check": self.check},
            fingerprint=self.fingerprint,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_index(self.out, index)
        (self.out / STATE_NAME).unlink(missing_ok=True)
        mb = index["size"] / 1e6
        self._say(
            f"wrote {index['count']} samples ({mb:.1f} MB) in {len(shards)} shard(s) to '{self.out}'"
            + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else "")
        )
        return index

    def _save_state(
        self, next_file: int, shards: list[dict[str, Any]], skipped: list[dict[str, str]]
    ) -> None:
        state = {"fingerprint": self.fingerprint, "next": next_file, "shards": shards, "skipped": skipped}
        _write_json_atomic(self.out / STATE_NAME, state)

    def _say(self, message: str) -> None:
        self.say(message)


def pack_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    maxcount: int = 1000,
    maxsize: int = 10**9,
    prefix: str = "shard",
    on_bad_image: Literal["error", "skip"] = "error",
    check: Literal["header", "decode"] = "header",
    latents: LatentOptions | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Pack every image under ``src`` into ``out/<prefix>-NNNNNN.tar`` and write ``out/index.json``.

    Args:
        src: Folder of images (searched recursively, sorted).
        out: Output folder (created). Rerunning after an interruption resumes; a finished, identical run
            is left as is.
        maxcount: Samples per shard at most.
        maxsize: Bytes per shard at most (a single larger sample gets a shard of its own).
        prefix: Shard file name prefix.
        on_bad_image: ``"error"``: an unreadable image stops the run, naming it; ``"skip"``: it is warned
            about, left out and listed under ``skipped`` in the index.
        check: ``"header"`` reads each image's header; ``"decode"`` decodes it fully (slower, also catches
            truncated pixel data). Always ``decode`` with latents.
        latents: Cache latents of fixed crops (see :class:`LatentOptions`).
        overwrite: Replace shards, index and state of an earlier run in ``out`` (other files are kept).
        say: Receives one-line messages (resuming, already complete, the summary).
        progress: Called as ``progress(images_done, images_total)`` after every image.

    Returns:
        The index written to ``out/index.json``.
    """
    if maxcount < 1:
        raise ShardError(f"--maxcount must be >= 1, got {maxcount}")
    if maxsize < 1:
        raise ShardError(f"--maxsize must be >= 1, got {maxsize}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ShardError(f"--prefix must use letters, digits, '-' and '_' only, got {prefix!r}")
    if latents is not None and (latents.crop < 8 or latents.crops_per_image < 1):
        raise ShardError(
            f"--crop ({latents.crop}) and --crops-per-image ({latents.crops_per_image}) too small"
        )
    try:
        packer = _Packer(
            Path(src),
            Path(out),
            maxcount,
            maxsize,
            prefix,
            on_bad_image,
            check,
            latents,
            say or (lambda message: None),
            progress or (lambda done, total: None),
        )
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ShardError(str(exc)) from exc
    except ValueError as exc:  # list_images: an empty folder
        raise ShardError(str(exc)) from exc
    return packer.run(overwrite)
