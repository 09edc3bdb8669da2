"""The aligner contract: z_hat -> timestep, one per image (B,) or a spatial map (B,1,h,w)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class TimestepAligner(nn.Module, ABC):
    """Chooses the timestep at which the one-step enhancer denoises ``z_hat``.

    Returns a (B,) tensor or a (B,1,h,w) map in the backbone's timestep units. Aligners that
    need the true HR latent (analysis tools such as an oracle) receive it as ``z_true``.
    """

    @abstractmethod
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor: ...


from tadm.registry import ALIGNERS  # noqa: E402

ALIGNERS.base = TimestepAligner
