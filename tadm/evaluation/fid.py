"""FID and KID as torchmetrics / torch-fidelity compute them (Inception features; Frechet distance, and the
unbiased MMD with a cubic polynomial kernel), accumulated image by image.

FID needs only running sums; KID needs the feature vectors themselves, which are kept (2048 float64 values,
16 KB, per image and method: 100 MB for 2,000 images and two methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"
#: torchmetrics' and torch-fidelity's defaults: 100 random subsets of 1000 images
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100


def load_fid_inception(weights: str | None) -> nn.Module:
    """torchmetrics' FID Inception (2048 features, takes uint8 images of any size); raises when unavailable."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).inception


def fid_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


class FeatureStats:
    """Running sum and outer-product sum of features (for FID), and the features themselves (for KID)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None
        self._features: list[Tensor] = []

    def add(self, features: Tensor) -> None:
        f = features.double().reshape(features.shape[0], -1)
        s, o = f.sum(0), f.T @ f
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += f.shape[0]
        self._features.append(f.cpu())

    @property
    def features(self) -> Tensor:
        """All features added, (count, D) float64 on the CPU."""
        return torch.cat(self._features) if self._features else torch.zeros(0, 0, dtype=torch.float64)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.outer is not None and self.count >= 2
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(real: FeatureStats, fake: FeatureStats) -> float:
    """FID between two feature sets, with torchmetrics' formula (eigenvalues of the covariance product)."""
    mu1, s1 = fake.mean_cov()
    mu2, s2 = real.mean_cov()
    a = (mu1 - mu2).square().sum()
    b = s1.trace() + s2.trace()
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(a + b - 2 * c)


@dataclass(frozen=True)
class KID:
    """Kernel Inception Distance: the mean (and the standard deviation) over ``subsets`` random subsets of
    ``subset_size`` images of each set."""

    mean: float
    std: float
    subset_size: int
    subsets: int


def kernel_inception_distance(
    real: FeatureStats,
    fake: FeatureStats,
    subset_size: int = KID_SUBSET_SIZE,
    subsets: int = KID_SUBSETS,
    seed: int = 0,
) -> KID:
    """KID with torchmetrics' formula (``poly_mmd``: kernel ``(x.y / D + 1)^3``, unbiased MMD^2) and subsets.

    torchmetrics and torch-fidelity refuse sets smaller than the subset size (1000); here the subset size
    shrinks to the smaller set, as clean-fid does, and when that is both whole sets the one subset is
    computed once (std 0). The subsets come from a generator seeded with ``seed``: the same run gives the
    same KID. Needs at least 2 images in each set.
    """
    from torchmetrics.image.kid import poly_mmd

    r, f = real.features, fake.features
    m = min(subset_size, len(r), len(f))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images, got {m}")
    if m == len(r) == len(f):
        return KID(float(poly_mmd(r, f)), 0.0, m, 1)
    g = torch.Generator().manual_seed(seed)
    scores = torch.stack(
        [
            poly_mmd(r[torch.randperm(len(r), generator=g)[:m]], f[torch.randperm(len(f), generator=g)[:m]])
            for _ in range(subsets)
        ]
    )
    return KID(float(scores.mean()), float(scores.std(unbiased=False)), m, subsets)
