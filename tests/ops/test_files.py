"""tadm.ops.files.atomic_write: the temp file sits beside the target, its data reaches the disk before the
rename and the rename before the call returns, and a failure anywhere leaves the old file and no temp."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tadm.ops.files import DestinationExists, atomic_write, atomic_write_text


def _fsync_spy(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]], fail_files: bool = False
) -> None:
    """Record fsyncs (of a file or a folder) and renames in order; with ``fail_files`` a file's fsync
    reports a full disk, as delayed allocation or a network filesystem does."""
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        if fail_files and kind == "file":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    def spy_replace(src: str, dst: str | os.PathLike[str]) -> None:
        events.append(("replace", f"{Path(src).parent == Path(dst).parent} {Path(src).name}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)


def test_the_temp_file_is_fsynced_then_renamed_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    _fsync_spy(monkeypatch, events)
    out = atomic_write_text(tmp_path / "sub" / "config.yaml", "a: 1\n")
    assert out == tmp_path / "sub" / "config.yaml" and out.read_text() == "a: 1\n"
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0] == ("fsync", "file") and events[2] == ("fsync", "dir")
    same_folder, name = events[1][1].split(" ")
    assert same_folder == "True" and name.startswith(".config.yaml.") and name.endswith(".tmp")
    assert sorted(os.listdir(tmp_path / "sub")) == ["config.yaml"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_a_full_disk_at_fsync_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write itself can succeed and the disk be full only when the data is flushed."""
    target = tmp_path / "manifest.json"
    target.write_text("old")
    events: list[tuple[str, str]] = []
    _fsync_spy(monkeypatch, events, fail_files=True)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new")
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["manifest.json"]
    assert events == [("fsync", "file")]  # never renamed


def test_a_failing_writer_propagates_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, half_then_full)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]


def _taken_during_write(target: Path, theirs: bytes) -> Callable[[Path], None]:
    """A writer that writes its temp file while another process finishes ``target`` (after any early
    existence check, before the final step)."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"mine")
        target.write_bytes(theirs)

    return write


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_without_overwrite_a_name_taken_meanwhile_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    """Two runs writing one name: the first to finish keeps it, the second gets DestinationExists and
    leaves no temp file. Without hard links (FAT, some network filesystems) an O_EXCL claim does it."""
    if not links:

        def no_links(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "a.png"
    with pytest.raises(DestinationExists) as info:
        atomic_write(target, _taken_during_write(target, b"theirs"), overwrite=False)
    assert isinstance(info.value, FileExistsError) and str(target) in str(info.value)
    assert target.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["a.png"]
    # a free name is written, with the usual permissions, and only the final file remains
    fresh = atomic_write(tmp_path / "b.png", lambda tmp: tmp.write_bytes(b"new"), overwrite=False)
    assert fresh.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    # the default (overwrite) still replaces atomically
    atomic_write(target, _taken_during_write(target, b"theirs"))
    assert target.read_bytes() == b"mine"


def test_without_hard_links_a_failed_rename_removes_its_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The O_EXCL fallback claims the name with an empty file first; if the rename onto it fails, the claim
    goes too (nothing half-written is left under the name)."""

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"x"), overwrite=False)
    assert os.listdir(tmp_path) == []
