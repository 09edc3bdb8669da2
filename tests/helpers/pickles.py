"""Pickles that would run code if unpickled (what a malicious checkpoint does), written the ways such files
come: ``torch.save`` (a zip holding a protocol-2 pickle, or protocol 4) and a bare pickle (protocol 2, or
Python's default). Each payload touches a marker file, so a test can tell that nothing ran."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import torch


class _System:
    """``os.system("touch MARKER")``: protocol 2 names it ``posix.system`` (on POSIX)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class _Eval:
    """``eval("open(MARKER, 'w').close()")``: a builtin, which torch names without its module."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    """``subprocess.Popen(["touch", MARKER])``: protocol 2 writes its Python 2 name, ``commands.Popen``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[list[str]]]:
        return (subprocess.Popen, (["touch", str(self.marker)],))


class Plain:
    """A plain class of one's own: unpickling it imports this module and runs ``__setstate__``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["marker"]).touch()


#: payload name -> (its class, the name a refusal must give the object)
PAYLOADS: dict[str, tuple[type, str]] = {
    "os.system": (_System, f"{os.system.__module__}.system"),
    "eval": (_Eval, "eval"),
    "subprocess.Popen": (_Popen, "subprocess.Popen"),
    "custom class": (Plain, f"{__name__}.Plain"),
}
#: how the file is written
FORMATS = ("torch.save", "torch.save protocol 4", "pickle protocol 2", "pickle default protocol")


def write_evil(path: Path, payload: str, marker: Path, fmt: str = "torch.save") -> str:
    """A checkpoint-like dict with the payload in it, written as ``fmt``; returns the object's name."""
    cls, name = PAYLOADS[payload]
    # the payload first: torch names the first global it refuses
    obj = {"extra": cls(marker), "state_dict": {"w": torch.zeros(2)}, "tadm": {"stage": "enhancer"}}
    if fmt == "torch.save":
        torch.save(obj, path)
    elif fmt == "torch.save protocol 4":
        torch.save(obj, path, pickle_protocol=4)
    elif fmt == "pickle protocol 2":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    elif fmt == "pickle default protocol":
        path.write_bytes(pickle.dumps(obj))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return name
