"""TADM's Time-step Prediction Module: one continuous timestep per image from z_hat."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadm.contracts import ALIGNERS, TimestepAligner
from tadm.ops.blocks import Activation, ConvBlock, ResBlock


class LatentTrunk(nn.Sequential):
    """ConvBlock(C->width) + ``num_blocks`` ResBlocks(width): the TPM's conv feature extractor."""

    def __init__(
        self,
        latent_channels: int = 4,
        width: int = 32,
        num_blocks: int = 6,
        activation: Activation = "leaky_relu",
    ) -> None:
        super().__init__(
            ConvBlock(latent_channels, width), *(ResBlock(width, activation) for _ in range(num_blocks))
        )


def channel_stats(feat: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """Per-channel spatial mean and std, (B,C,h,w) -> (B,2C).

    Default: std = sqrt(var + eps) with the population variance, defined (and with a finite gradient)
    even for a 1x1 latent or a constant channel. ``unbiased``: ``torch.std`` as the authors' release
    computes it (Bessel-corrected, no eps; NaN for a 1x1 latent, which tiled inference never makes).
    """
    mean = feat.mean(dim=(2, 3))
    if unbiased:
        return torch.cat([mean, feat.std(dim=(2, 3), correction=1)], dim=1)
    var = feat.var(dim=(2, 3), correction=0)
    return torch.cat([mean, (var + eps).sqrt()], dim=1)


def scale_to_range(logit: Tensor, t_min: float, t_max: float) -> Tensor:
    """t = t_min + (t_max - t_min) * sigmoid(logit), in float32 (timesteps never in bf16)."""
    return t_min + (t_max - t_min) * torch.sigmoid(logit.float())


def follow_backbone(aligner: TimestepAligner, trunk: LatentTrunk, channels: int) -> None:
    """Rebuild the trunk's input conv for ``channels`` when the aligner follows the backbone's latent
    channels (``latent_channels`` left at None); otherwise the contract's check."""
    if not getattr(aligner, "follows_backbone", False) or channels == aligner.latent_channels:
        TimestepAligner.match_latent_channels(aligner, channels)
        return
    first = trunk[0][0]
    trunk[0] = ConvBlock(channels, first.out_channels).to(first.weight.device)
    aligner.latent_channels = channels


def check_range(t_min: float, t_max: float) -> None:
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")


@ALIGNERS.register("tpm")
class TimestepPredictionModule(TimestepAligner):
    """TADM's TPM: one learned timestep per image, t_min..t_max (about 1.2 M parameters).

    ConvBlock(C->32), 6 ResBlocks(32), per-channel global mean and std (64 values), MLP
    64->512, 4 x [ReLU, 512->512], ReLU, 512->1, sigmoid scaled to [t_min, t_max]. It has no loss
    of its own: it learns through the time embeddings of the UNet and the Refiner that consume t.
    The three release options keep the parameter names, so the authors' weights load either way.
    """

    def __init__(
        self,
        latent_channels: int | None = None,
        t_min: float = 10.0,
        t_max: float = 200.0,
        hidden: int = 512,
        width: int = 32,
        activation: Activation = "leaky_relu",
        unbiased_std: bool = False,
        relu_before_output: bool = True,
    ) -> None:
        """
        Args:
            latent_channels: channels of z_hat. Default: the backbone's (built for 4, the SD VAEs', and
                rebuilt for 16 on SD 3 / FLUX when the model attaches it); a number is checked instead.
            t_min: smallest timestep it can output (the paper: 10), in TADM's reference units (SD's 1000-step
                schedule); mapped to the backbone's units when the model attaches it (identity on SD).
            t_max: largest timestep it can output (the paper: 200), in the same units.
            hidden: width of the MLP head.
            width: channels of the conv trunk.
            activation: of the trunk's residual blocks: ``leaky_relu`` (tadm) or ``relu`` (the release's
                BasicSR ``ResidualBlockNoBN``: ReLU, kaiming x 0.1 init).
            unbiased_std: the statistics' std as the release computes it (``torch.std``: Bessel-corrected,
                no eps) instead of sqrt(population variance + 1e-6).
            relu_before_output: a ReLU between the last two linears (tadm: it keeps them from collapsing
                into one); the release has none (``false``).
        """
        super().__init__()
        check_range(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.follows_backbone = latent_channels is None
        self.latent_channels = 4 if latent_channels is None else latent_channels
        self.unbiased_std = unbiased_std
        self.trunk = LatentTrunk(self.latent_channels, width, activation=activation)
        layers: list[nn.Module] = [nn.Linear(2 * width, hidden)]
        for _ in range(4):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        # an Identity in the release's variant keeps the last linear at index 10 (same state-dict keys)
        layers += [nn.ReLU() if relu_before_output else nn.Identity(), nn.Linear(hidden, 1)]
        self.head = nn.Sequential(*layers)

    def match_latent_channels(self, channels: int) -> None:
        follow_backbone(self, self.trunk, channels)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        stats = channel_stats(self.trunk(z_hat), unbiased=self.unbiased_std)
        return scale_to_range(self.head(stats).squeeze(1), self.t_min, self.t_max)

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}"
