"""The backbone contract: latent encode/decode now, one-step prediction for the enhancer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Literal

from torch import Tensor, nn

Stage = Literal["rescaler", "enhancer", "joint"]
Part = Literal["vae", "unet", "text"]

STAGE_PARTS: dict[str, frozenset[str]] = {
    "rescaler": frozenset({"vae"}),
    "enhancer": frozenset({"vae", "unet", "text"}),
    "joint": frozenset({"vae", "unet", "text"}),
}


class DiffusionBackbone(nn.Module, ABC):
    """A latent autoencoder plus (optionally) a diffusion UNet and its noise schedule.

    Construction is cheap: it records where weights come from. :meth:`load` then builds only
    the parts a training stage needs (stage 1 needs the VAE alone), so ``--print_config`` and
    stage-1 runs never touch UNet or text-encoder weights.

    Every latent is in the *scaled* space: ``encode`` returns ``E(x) * scaling_factor`` and
    ``decode`` expects the same.
    """

    #: channels of the latent ``encode`` returns
    latent_channels: int
    #: spatial downsampling of the latent relative to the image
    downsample_factor: int = 8
    #: multiplier applied to the raw latent
    scaling_factor: float = 1.0

    @property
    @abstractmethod
    def backbone_id(self) -> str:
        """Identifies the weights (preset + source); checkpoints record it."""

    @abstractmethod
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet``, ``text``); idempotent."""

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> scaled latent (B,C,H/f,W/f)."""

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1] (clamped)."""

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters this backbone trains in ``stage``; nothing is trained in stage 1."""
        return []

    def load_for_stage(self, stage: str) -> None:
        if stage not in STAGE_PARTS:
            raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_PARTS)}")
        self.load(STAGE_PARTS[stage])


from tadm.registry import BACKBONES  # noqa: E402

BACKBONES.base = DiffusionBackbone
