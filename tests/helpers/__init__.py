"""Support code shared by the test modules (no test module imports another)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "assets" / "samples"
CONFIGS = REPO / "configs"
TRAIN = str(SAMPLES / "train")
VAL = str(SAMPLES / "val")


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script that is not in a package (benchmarks/*.py, assets/photos/prepare.py) by its path."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
