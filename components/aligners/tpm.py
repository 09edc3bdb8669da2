"""TADM's Time-step Prediction Module: one continuous timestep per image from z_hat."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadm.contracts import ALIGNERS, TimestepAligner
from tadm.ops.blocks import ConvBlock, ResBlock


class LatentTrunk(nn.Sequential):
    """ConvBlock(C->width) + ``num_blocks`` ResBlocks(width): the TPM's conv feature extractor."""

    def __init__(self, latent_channels: int = 4, width: int = 32, num_blocks: int = 6) -> None:
        super().__init__(ConvBlock(latent_channels, width), *(ResBlock(width) for _ in range(num_blocks)))


def channel_stats(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel spatial mean and std, (B,C,h,w) -> (B,2C).

    std = sqrt(var + eps) with the population variance: defined (and with a finite gradient)
    even for a 1x1 latent or a constant channel.
    """
    mean = feat.mean(dim=(2, 3))
    var = feat.var(dim=(2, 3), correction=0)
    return torch.cat([mean, (var + eps).sqrt()], dim=1)


def scale_to_range(logit: Tensor, t_min: float, t_max: float) -> Tensor:
    """t = t_min + (t_max - t_min) * sigmoid(logit), in float32 (timesteps never in bf16)."""
    return t_min + (t_max - t_min) * torch.sigmoid(logit.float())


def check_range(t_min: float, t_max: float) -> None:
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")


@ALIGNERS.register("tpm")
class TimestepPredictionModule(TimestepAligner):
    """TADM's TPM: one learned timestep per image, t_min..t_max (about 1.2 M parameters).

    ConvBlock(C->32), 6 ResBlocks(32), per-channel global mean and std (64 values), MLP
    64->512, 4 x [ReLU, 512->512], ReLU, 512->1, sigmoid scaled to [t_min, t_max]. It has no loss
    of its own: it learns through the time embeddings of the UNet and the Refiner that consume t.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        t_min: float = 10.0,
        t_max: float = 200.0,
        hidden: int = 512,
        width: int = 32,
    ) -> None:
        """
        Args:
            latent_channels: channels of z_hat (4 for SD 1.x/2.x/XL VAEs).
            t_min: smallest timestep it can output (the paper: 10).
            t_max: largest timestep it can output (the paper: 200).
            hidden: width of the MLP head.
            width: channels of the conv trunk.
        """
        super().__init__()
        check_range(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.latent_channels = latent_channels
        self.trunk = LatentTrunk(latent_channels, width)
        layers: list[nn.Module] = [nn.Linear(2 * width, hidden)]
        for _ in range(4):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        layers += [nn.ReLU(), nn.Linear(hidden, 1)]  # the ReLU keeps the last two linears from collapsing
        self.head = nn.Sequential(*layers)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        logit = self.head(channel_stats(self.trunk(z_hat))).squeeze(1)
        return scale_to_range(logit, self.t_min, self.t_max)

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}"
