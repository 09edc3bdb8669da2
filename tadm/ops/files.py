"""Atomic file writes: a temp file in the target folder, flushed to disk, renamed into place.

An interrupted writer (full disk, quota, kill, power loss) leaves either the old file or the new one
under the final name, never a partial file: the temp file sits in the destination folder (a rename
within one filesystem is atomic; a copy from the system temp folder is not), its data is fsynced
before the rename (else a crash can leave the new name pointing at an empty file), and the folder is
fsynced after it (else the rename itself can be lost). The temp file is removed on any error (a hard
kill can leave a hidden ``.*.tmp`` only).

``overwrite=False`` never replaces a file: a command that skips existing outputs checks early (to save the
work), but another run may finish the same name meanwhile, so the final step itself must fail on a taken
name. It hard-links the temp file to the name (a link, unlike a rename, fails when the name exists) and
removes the temp name; where the filesystem has no hard links it claims the name with ``O_EXCL`` and
renames onto its own (empty) claim.
"""

from __future__ import annotations

import contextlib
import errno
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


class DestinationExists(FileExistsError):
    """``atomic_write(..., overwrite=False)`` found its name taken at the final step (another run wrote it
    after the caller's early check); the file there was left alone and the temp file removed."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(temp_path)``, then fsync the temp file and rename it to ``path`` (usual permissions).

    The temp file is ``.<name>.<random>.tmp`` in ``path``'s folder. Whatever ``write`` (or the fsync,
    or the rename) raises propagates after the temp file is removed; the file under ``path`` is then
    the one that was there before (or none). With ``overwrite=False`` an existing ``path`` is never
    replaced, even one that appeared while ``write`` ran: :class:`DestinationExists` instead."""
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
        if overwrite:
            os.replace(tmp, dest)
        else:
            _place_new(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest


def _place_new(tmp: str, dest: Path) -> None:
    """Give the finished ``tmp`` the name ``dest`` only if nothing has that name (atomically)."""
    try:
        os.link(tmp, dest)  # fails with FileExistsError on a taken name: never replaces
    except FileExistsError:
        raise _exists(dest) from None
    except OSError:  # no hard links on this filesystem (FAT, exFAT, some network and FUSE mounts)
        _claim_then_replace(tmp, dest)
        return
    os.unlink(tmp)  # the file now has both names; a kill right here leaves the hidden temp name only


def _claim_then_replace(tmp: str, dest: Path) -> None:
    """Claim ``dest`` with ``O_EXCL`` (fails on a taken name), then rename ``tmp`` onto the claim. The name
    holds an empty file for that instant; if the rename fails the claim is removed (unless another
    ``--overwrite`` run has replaced it meanwhile: its file stays)."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise _exists(dest) from None
    try:
        claim = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            now = os.stat(dest)
            if (now.st_dev, now.st_ino) == (claim.st_dev, claim.st_ino):
                os.unlink(dest)
        raise


def _exists(dest: Path) -> DestinationExists:
    return DestinationExists(errno.EEXIST, "exists already (left as it is)", str(dest))


def atomic_write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    """Write UTF-8 text atomically (``overwrite``: as :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)
