"""Bicubic down + bicubic up: the parameter-free baseline every study compares against."""

from __future__ import annotations

from torch import Tensor

from tadm.contracts import RESCALERS, Rescaler, quantize_8bit
from tadm.ops.images import bicubic_down, bicubic_resize


@RESCALERS.register("bicubic")
class Bicubic(Rescaler):
    """Antialiased bicubic downscale to an 8-bit LR image and bicubic upscale back (no parameters)."""

    space = "pixel"

    def __init__(self, scale: int = 16) -> None:
        """
        Args:
            scale: HR -> LR downscaling factor.
        """
        super().__init__(scale)

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        # Always round: the baseline stores a real 8-bit image, there is nothing to train.
        return quantize_8bit(bicubic_down(x, self.scale), training=False)

    def upscale(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2:]
        return bicubic_resize(y, (h * self.scale, w * self.scale))
