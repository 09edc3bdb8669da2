"""Loss helpers: distances and weighting of named loss terms."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from tadm.contracts import Distance

DistanceName = Literal["mse", "l1"]

DISTANCES: dict[str, Distance] = {"mse": F.mse_loss, "l1": F.l1_loss}

#: stage-1 weights of the authors' release (the paper writes the latent terms with L1)
DEFAULT_STAGE1_WEIGHTS: dict[str, float] = {"lr": 3.0, "latent_forward": 1.0, "latent_backward": 1.0}
#: stage-2 weights of the release: 2 * MSE(x_hat, x) + 5 * LPIPS_vgg + 5 * DISTS
DEFAULT_STAGE2_WEIGHTS: dict[str, float] = {"pixel": 2.0, "lpips": 5.0, "dists": 5.0}


def get_distance(name: str) -> Distance:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose one of {sorted(DISTANCES)}")
    return DISTANCES[name]


def weighted_sum(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Sum of ``weights[name] * term``. A term without a weight is an error, not a silent zero:
    a rescaler adding a new term must have it weighted in the config."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(
            f"loss terms {missing} have no weight; set model.loss_weights (known weights: {sorted(weights)})"
        )
    if not terms:
        raise ValueError("the rescaler returned no loss terms: nothing to train in this stage")
    return sum(weights[name] * value for name, value in terms.items())  # type: ignore[return-value]
