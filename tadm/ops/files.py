"""Atomic file writes: a temp file in the target folder, flushed to disk, renamed into place.

An interrupted writer (full disk, quota, kill, power loss) leaves either the old file or the new one
under the final name, never a partial file: the temp file sits in the destination folder (a rename
within one filesystem is atomic; a copy from the system temp folder is not), its data is fsynced
before the rename (else a crash can leave the new name pointing at an empty file), and the folder is
fsynced after it (else the rename itself can be lost). The temp file is removed on any error (a hard
kill can leave a hidden ``.*.tmp`` only).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk: until then a crash can lose it, and a full disk may not show."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk. Best effort: the rename is done and visible,
    and some systems (Windows, a few network filesystems) cannot open or fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)``, then fsync the temp file and rename it to ``path`` (usual permissions).

    The temp file is ``.<name>.<random>.tmp`` in ``path``'s folder. Whatever ``write`` (or the fsync,
    or the rename) raises propagates after the temp file is removed; the file under ``path`` is then
    the one that was there before (or none)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_file(tmp)  # a full disk may only show here (delayed allocation, network filesystems)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
