"""What a ``tadm demo`` job hands the page: a photo's round trip or an LR file's restoration, with its images,
files, scores and notes.

Plain data, apart from :mod:`tadm.demo.round_trip` which computes them: the page's HTML and pictures are made
from these alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Scores:
    """One reconstruction against the original, as ``tadm evaluate`` scores it (None: not computed)."""

    psnr_y: float
    ssim_y: float
    lpips: float | None = None
    dists: float | None = None

    @classmethod
    def from_metrics(cls, values: dict[str, float | None]) -> Scores:
        """From ``Metrics.image``'s values (PSNR-Y / SSIM-Y are always computed there)."""
        return cls(
            float(values["psnr_y"] or 0.0), float(values["ssim_y"] or 0.0), values["lpips"], values["dists"]
        )


@dataclass(kw_only=True)
class Result:
    """What both tabs show of a restored photo: the photo restored from the LR file, the enhancer's timestep
    map, notes and times (keyword-only: a subclass adds fields without defaults after these defaults)."""

    name: str
    lr: np.ndarray
    """(h, w, 3) uint8: the LR image, exactly the LR file's pixels."""
    restored: np.ndarray
    restored_file: Path
    timesteps: np.ndarray | None = None
    """(H, W, 3) uint8 heat map of the enhancer's timesteps (``tadm upscale --save-timesteps``); None: no enhancer."""
    timesteps_file: Path | None = None
    timestep_range: tuple[float, float] | None = None
    """The smallest and largest timestep the aligner chose."""
    aligner_range: tuple[float | None, float | None] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def hr_size(self) -> tuple[int, int]:
        return int(self.restored.shape[0]), int(self.restored.shape[1])


@dataclass(kw_only=True)
class PhotoResult(Result):
    """A photo's round trip: the files written (LR PNG, restored PNG, heat map) and what the page shows."""

    original: np.ndarray
    """(H, W, 3) uint8: the photo as the codec read it (16-bit, CMYK, palette ... converted as the commands do)."""
    lr_file: Path
    bicubic: np.ndarray
    scores: dict[str, Scores]
    """``restored`` and ``bicubic`` against the original."""

    @property
    def hr_size(self) -> tuple[int, int]:
        return int(self.original.shape[0]), int(self.original.shape[1])

    @property
    def lr_size(self) -> tuple[int, int]:
        return int(self.lr.shape[0]), int(self.lr.shape[1])

    @property
    def lr_bytes(self) -> int:
        return self.lr_file.stat().st_size

    @property
    def bits_per_pixel(self) -> float:
        """The LR file's size (metadata included) per pixel of the original."""
        h, w = self.hr_size
        return 8 * self.lr_bytes / (h * w)


@dataclass(kw_only=True)
class RestoreResult(Result):
    """An LR file restored alone (the receiving side of the codec)."""
