"""A per-pixel timestep map: the TPM made fully convolutional (beyond the paper).

TADM gets spatially varying timesteps only from tiling (one t per tile). This aligner predicts
a (B,1,h,w) map at the latent resolution directly, so flat regions and detailed regions of one
image can be denoised at different strengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.components.aligners.tpm import (
    LatentTrunk,
    channel_stats,
    check_range,
    follow_backbone,
    scale_to_range,
)
from tadm.contracts import ALIGNERS, TimestepAligner


@ALIGNERS.register("spatial_tpm")
class SpatialTPM(TimestepAligner):
    """Fully convolutional TPM: a smoothed per-pixel timestep map (B,1,h,w), t_min..t_max.

    The TPM's conv trunk, then a 1x1-conv head per pixel. The trunk sees only about 27 latent
    pixels around each position, so the image-wide channel statistics (the plain TPM's input)
    are appended to every pixel (``use_global``) and the head can set a per-image level plus a
    local modulation. The map is smoothed by a stride-1 average pool after the sigmoid scaling,
    which keeps it inside [t_min, t_max] (a convex combination) and free of pixel noise.
    """

    def __init__(
        self,
        latent_channels: int | None = None,
        t_min: float = 10.0,
        t_max: float = 200.0,
        width: int = 32,
        head_width: int = 64,
        use_global: bool = True,
        smooth_kernel: int = 3,
    ) -> None:
        """
        Args:
            latent_channels: channels of z_hat; default the backbone's (as the TPM's).
            t_min: smallest timestep in the map (TADM's reference units, mapped like the TPM's range).
            t_max: largest timestep in the map.
            width: channels of the conv trunk.
            head_width: channels of the 1x1-conv head.
            use_global: append the image-wide per-channel mean/std to every pixel's features.
            smooth_kernel: odd size of the average-pool smoothing of the map; 1 disables it.
        """
        super().__init__()
        check_range(t_min, t_max)
        if smooth_kernel < 1 or smooth_kernel % 2 == 0:
            raise ValueError(f"smooth_kernel must be an odd number >= 1, got {smooth_kernel}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.follows_backbone = latent_channels is None
        self.latent_channels = 4 if latent_channels is None else latent_channels
        self.use_global = use_global
        self.smooth_kernel = smooth_kernel
        self.trunk = LatentTrunk(self.latent_channels, width)
        cin = width + (2 * width if use_global else 0)
        self.head = nn.Sequential(
            nn.Conv2d(cin, head_width, 1),
            nn.ReLU(),
            nn.Conv2d(head_width, head_width, 1),
            nn.ReLU(),
            nn.Conv2d(head_width, 1, 1),
        )

    def match_latent_channels(self, channels: int) -> None:
        follow_backbone(self, self.trunk, channels)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        feat = self.trunk(z_hat)
        if self.use_global:
            stats = channel_stats(feat)[:, :, None, None].expand(-1, -1, *feat.shape[2:])
            feat = torch.cat([feat, stats], dim=1)
        t = scale_to_range(self.head(feat), self.t_min, self.t_max)
        if self.smooth_kernel > 1:
            k = self.smooth_kernel
            t = F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)
        return t

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}, smooth_kernel={self.smooth_kernel}"
