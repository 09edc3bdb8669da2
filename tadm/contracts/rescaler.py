"""The rescaler contract shared by DFRM, bicubic and any third-party rescaler, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from tadm.contracts.registry import Registry

Space = Literal["latent", "pixel"]
Distance = Callable[[Tensor, Tensor], Tensor]


class Rescaler(nn.Module, ABC):
    """Learns (or fixes) both directions: HR -> LR image and LR image -> reconstruction.

    ``space`` says what :meth:`upscale` reconstructs: ``"latent"`` (a latent of the backbone,
    decoded by its VAE decoder) or ``"pixel"`` (an image of the HR size, in [-1, 1] once the pipeline
    clamps it). In stages 2/3 a pixel rescaler's image is encoded by the VAE and enhanced like a latent
    rescaler's z_hat (the paper's "pixel-space rescaling + SD prior" ablation).
    Inputs to :meth:`downscale` have sizes that are multiples of ``scale`` (the pipeline pads).
    """

    space: Space = "latent"
    #: latent channels a latent rescaler expects from the backbone (None: any, or a pixel rescaler);
    #: the model checks it against the backbone's ``latent_channels`` at construction
    latent_channels: int | None = None

    def __init__(self, scale: int = 16) -> None:
        super().__init__()
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"scale must be a power of two >= 2, got {scale}")
        self.scale = scale

    @abstractmethod
    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """HR image ``x`` (B,3,H,W in [-1,1]) and its latent ``z`` -> LR image (B,3,H/s,W/s).

        In training mode the LR image carries quantisation noise; in eval mode it is rounded to
        exactly the 8-bit values that get stored.
        """

    @abstractmethod
    def upscale(self, y: Tensor) -> Tensor:
        """LR image -> latent (``space == "latent"``) or HR image (``space == "pixel"``)."""

    def upscale_noise(self, y: Tensor) -> Tensor | None:
        """The random draw :meth:`upscale` makes for the LR batch ``y``, on ``y``'s grid (B, C, h, w), or
        None: a deterministic upscale (the default).

        A rescaler that samples when it upscales (IRN's z) overrides this and accepts the draw as
        ``upscale(y, noise)``. The pipeline then draws once for the whole LR image and hands each tile
        its part, so an image upscaled in tiles gets the draw it gets upscaled whole; drawn inside
        ``upscale``, every tile would get the same pattern (the same seed) and tiled != whole.
        """
        return None

    def training_losses(
        self, x: Tensor, z: Tensor | None, distance: Distance, outputs: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Unweighted stage-1 loss terms by name; the LightningModule applies the weights.

        A rescaler may put ``outputs["z_hat"] = upscale(downscale(x, z))`` (with gradients) into
        ``outputs``: the joint stage then enhances it instead of running the rescaler twice (a pixel
        rescaler's is its image, which the joint stage encodes with the VAE). ``z`` is None for a pixel
        rescaler. The default covers rescalers without parameters of their own (nothing to train).
        """
        return {}

    @property
    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


def quantize_8bit(y: Tensor, training: bool, mode: Literal["noise", "ste"] = "noise") -> Tensor:
    """Quantise an image in [-1, 1] to 8 bits.

    Eval: clamp and round, so the result is exactly what an 8-bit PNG stores.
    Training: ``noise`` adds U(-0.5, 0.5)/255 (differentiable proxy of rounding, as in the paper);
    ``ste`` rounds in the forward pass and passes gradients straight through.
    """
    v = (y + 1.0) * 127.5
    if not training:
        v = v.clamp(0.0, 255.0).round()
    elif mode == "noise":
        v = (v + torch.empty_like(v).uniform_(-0.5, 0.5)).clamp(0.0, 255.0)
    elif mode == "ste":
        r = v.clamp(0.0, 255.0).round()
        v = v + (r - v).detach()
    else:
        raise ValueError(f"unknown quantisation mode {mode!r}; use 'noise' or 'ste'")
    return v / 127.5 - 1.0


#: short names of rescalers (``class_path: dfrm``); ``@RESCALERS.register("name")`` adds one
RESCALERS = Registry("rescaler", Rescaler)
