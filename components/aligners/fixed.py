"""A constant timestep: the paper's fixed-t baselines (t=1 fidelity, t=999 texture) and ablations."""

from __future__ import annotations

import torch
from torch import Tensor

from tadm.contracts import ALIGNERS, TimestepAligner


@ALIGNERS.register("fixed")
class FixedTimestep(TimestepAligner):
    """The same timestep for every image (no parameters)."""

    reference_timesteps = ("t",)

    def __init__(self, t: float = 200.0) -> None:
        """
        Args:
            t: the timestep in TADM's reference units (SD's 1000-step schedule, 0 .. 999); a flow backbone
                maps it to its own units (the same noise level) when the model attaches it.
        """
        super().__init__()
        if t < 0:
            raise ValueError(f"fixed timestep t must be >= 0, got {t}")
        self.t = float(t)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        # float32 whatever z_hat's dtype: bf16 cannot even represent most timesteps above 256
        return torch.full((z_hat.shape[0],), self.t, device=z_hat.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"t={self.t}"
