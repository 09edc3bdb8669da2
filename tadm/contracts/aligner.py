"""The aligner contract: z_hat -> timestep, one per image (B,) or a spatial map (B,1,h,w)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from tadm.contracts.registry import Registry


class TimestepAligner(nn.Module, ABC):
    """Chooses the timestep at which the one-step enhancer denoises ``z_hat``.

    Returns a (B,) tensor or a (B,1,h,w) map in the backbone's timestep units. Aligners that
    need the true HR latent (analysis tools such as an oracle) receive it as ``z_true``.
    """

    #: True for analysis aligners that need ``z_true`` (the HR latent): unusable for real upscaling
    needs_true_latent: ClassVar[bool] = False
    #: the range the aligner's timesteps lie in (heat maps are drawn on it); None: not bounded
    t_min: float | None = None
    t_max: float | None = None
    #: latent channels the aligner expects (None: any); checked against the backbone's
    latent_channels: int | None = None

    @abstractmethod
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor: ...

    def attach_schedule(self, alphas_cumprod: Tensor) -> None:
        """Receive the backbone's noise schedule (the model calls this once).

        Stored as a non-persistent buffer ``alphas_cumprod`` (it follows ``.to(device)`` but is
        never written into checkpoints: the backbone owns it). Most aligners ignore it.
        """
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)

    def require_schedule(self) -> Tensor:
        """The attached schedule, or a clear error naming the missing ``attach_schedule`` call."""
        schedule = self._buffers.get("alphas_cumprod")
        if schedule is None:
            raise RuntimeError(
                f"aligner {type(self).__name__} needs the noise schedule: call "
                "aligner.attach_schedule(backbone.alphas_cumprod) before using it"
            )
        return schedule


#: short names of timestep aligners (``class_path: tpm``)
ALIGNERS = Registry("aligner", TimestepAligner)
