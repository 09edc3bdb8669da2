"""FID as torchmetrics / torch-fidelity compute it (Inception features, Frechet distance), accumulated
image by image: running sums instead of every feature vector, so a test set of 8K images fits in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"


def load_fid_inception(weights: str | None) -> nn.Module:
    """torchmetrics' FID Inception (2048 features, takes uint8 images of any size); raises when unavailable."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).inception


def fid_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


class FeatureStats:
    """Running sum and outer-product sum of features: FID without keeping every feature vector."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, features: Tensor) -> None:
        f = features.double().reshape(features.shape[0], -1)
        s, o = f.sum(0), f.T @ f
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += f.shape[0]

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
