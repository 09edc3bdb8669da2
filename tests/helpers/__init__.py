"""Support code shared by the test modules (no test module imports another)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "assets" / "samples"
CONFIGS = REPO / "configs"
TRAIN = str(SAMPLES / "train")
VAL = str(SAMPLES / "val")
