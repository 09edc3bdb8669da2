"""The aligner contract: z_hat -> timestep, one per image (B,) or a spatial map (B,1,h,w)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from tadm.contracts.registry import Registry
from tadm.ops.diffusion import DDPMTime, TimeConvention


class TimestepAligner(nn.Module, ABC):
    """Chooses the timestep at which the one-step enhancer denoises ``z_hat``.

    Returns a (B,) tensor or a (B,1,h,w) map in the backbone's timestep units. Aligners that
    need the true HR latent (analysis tools such as an oracle) receive it as ``z_true``.

    Timesteps an aligner is *configured* with (its range, a constant t) are written in TADM's reference
    units, SD's 1000-step DDPM schedule, whatever the backbone: :meth:`attach_time` maps the attributes
    named in :attr:`reference_timesteps` into the backbone's units (the identity for every SD family; for
    a flow backbone, the same noise level, see :class:`tadm.ops.diffusion.FlowTime`).
    """

    #: True for analysis aligners that need ``z_true`` (the HR latent): unusable for real upscaling
    needs_true_latent: ClassVar[bool] = False
    #: the range the aligner's timesteps lie in (heat maps are drawn on it); None: not bounded
    t_min: float | None = None
    t_max: float | None = None
    #: latent channels the aligner expects (None: any); checked against the backbone's
    latent_channels: int | None = None
    #: attributes holding configured timesteps in TADM's reference units, mapped by :meth:`attach_time`
    reference_timesteps: ClassVar[tuple[str, ...]] = ("t_min", "t_max")

    @abstractmethod
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor: ...

    def match_latent_channels(self, channels: int) -> None:
        """The model calls this with the backbone's latent channels (4 on SD, 16 on SD 3 / FLUX) before any
        weights are loaded. An aligner built for another count is an error naming both; one whose
        ``latent_channels`` was left to follow the backbone rebuilds its input layer (the TPMs)."""
        if self.latent_channels is not None and self.latent_channels != channels:
            raise ValueError(
                f"model.aligner expects {self.latent_channels} latent channels, the backbone gives {channels}"
            )

    def attach_time(self, time: TimeConvention) -> None:
        """Receive the backbone's time convention (the model calls this once; calling it again re-maps
        from the configured values, never from already mapped ones).

        Maps the :attr:`reference_timesteps` attributes into the backbone's units and keeps ``time``
        (:meth:`require_time`). A DDPM convention is also passed to :meth:`attach_schedule`, the hook DDPM
        aligners have always had.
        """
        configured = self.__dict__.setdefault(
            "_configured_timesteps", {name: getattr(self, name) for name in self.reference_timesteps}
        )
        for name, value in configured.items():
            setattr(self, name, None if value is None else time.from_reference(float(value)))
        self.__dict__["_time_convention"] = time
        if isinstance(time, DDPMTime):
            self.attach_schedule(time.alphas_cumprod)

    def require_time(self) -> TimeConvention:
        """The attached time convention (a DDPM one on the device of this aligner's schedule buffer), or a
        clear error naming the missing ``attach_time`` / ``attach_schedule`` call."""
        time = self.__dict__.get("_time_convention")
        schedule = self._buffers.get("alphas_cumprod")
        if schedule is not None and (time is None or isinstance(time, DDPMTime)):
            return DDPMTime(schedule, None if time is None else time.prediction_type)
        if time is None:
            raise RuntimeError(
                f"aligner {type(self).__name__} needs the backbone's time convention: call "
                "aligner.attach_time(backbone.time_convention) (or attach_schedule(backbone.alphas_cumprod) "
                "for a DDPM backbone) before using it"
            )
        return time

    def attach_schedule(self, alphas_cumprod: Tensor) -> None:
        """Receive a DDPM backbone's noise schedule (:meth:`attach_time` calls this for DDPM backbones).

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
