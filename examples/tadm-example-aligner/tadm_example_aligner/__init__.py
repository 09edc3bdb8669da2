"""An example tadm timestep aligner shipped in its own package (registered through an entry point)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadm.contracts import ALIGNERS, TimestepAligner


@ALIGNERS.register("example_stats")
class LatentStatsAligner(TimestepAligner):
    """One timestep per image, a learned linear function of z_hat's per-channel mean and std.

    t = t_min + (t_max - t_min) * sigmoid(linear([mean, std])): a TPM without the conv trunk and
    the MLP, small enough to read in one go. It learns through the UNet and the Refiner that consume t.
    """

    def __init__(self, latent_channels: int = 4, t_min: float = 10.0, t_max: float = 200.0) -> None:
        """
        Args:
            latent_channels: channels of z_hat (4 for the SD 1.x/2.x/XL VAEs; checked against the backbone).
            t_min: smallest timestep it outputs, in the backbone's units.
            t_max: largest timestep it outputs.
        """
        super().__init__()
        if not 0 <= t_min < t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.latent_channels = latent_channels
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.linear = nn.Linear(2 * latent_channels, 1)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        z = z_hat.float()
        stats = torch.cat([z.mean(dim=(2, 3)), z.std(dim=(2, 3), correction=0)], dim=1)
        # (B,) in float32: bf16 cannot represent most timesteps above 256
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.linear(stats).squeeze(1))

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}"
