"""The oracle timestep: matched to the measured error of z_hat against the true HR latent."""

from __future__ import annotations

import torch
from torch import Tensor

from tadm.contracts import ALIGNERS, TimestepAligner


@ALIGNERS.register("oracle")
class OracleTimestep(TimestepAligner):
    """Analysis only: t whose noise level equals z_hat's true error (needs the HR latent).

    For each image it measures m = mean((z_hat - z_true)^2) and returns the t with
    (1 - abar_t) / abar_t = m: the step at which x_t / sqrt(abar_t) = x0 + sqrt(m) * noise, i.e.
    the noise the diffuser expects matches the error the rescaler left. It is an upper-bound /
    diagnostic tool for comparing aligners; it CANNOT be used for real upscaling, where only the
    LR image exists and no HR latent is available. The output is detached (no gradient reaches
    the rescaler through the oracle). Needs the backbone's time convention (``attach_time``); for a
    flow backbone the same reads (sigma / (1 - sigma))^2 = m.
    """

    needs_true_latent = True

    def __init__(self, t_min: float = 1.0, t_max: float = 999.0) -> None:
        """
        Args:
            t_min: lower clamp of the returned timestep (TADM's reference units, mapped like the TPM's range).
            t_max: upper clamp of the returned timestep (at most T-1 of the schedule).
        """
        super().__init__()
        if not 0 <= t_min <= t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        if z_true is None:
            raise ValueError(
                "the oracle aligner needs the true HR latent z_true (an analysis tool: it cannot be used "
                "for real upscaling, where no HR image exists); pick a tpm/fixed aligner for inference"
            )
        if z_true.shape != z_hat.shape:
            raise ValueError(
                f"oracle aligner: z_true {tuple(z_true.shape)} and z_hat {tuple(z_hat.shape)} differ in shape"
            )
        time = self.require_time()
        with torch.no_grad():
            mse = (z_hat.float() - z_true.float()).pow(2).flatten(1).mean(dim=1)
            t = time.t_for_noise_ratio(mse, self.t_min, self.t_max)
        return t.float()

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}"
