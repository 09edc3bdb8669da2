"""IRN, the invertible rescaling network (Xiao et al., ECCV 2020), as a pixel-space rescaler.

The PSNR end of the field's baselines (IRN and T-IRN reach about 24.8 dB at x16 on DIV2K). Per x2
stage: a Haar transform (the 3 low-pass channels of the image first, then the detail bands) and affine
couplings that split the first 3 channels from the rest. After log2(scale) stages the first 3 channels
are the LR image; the rest, z (3 * (scale^2 - 1) channels at the LR size), is the high-frequency part
that is thrown away. Upscaling runs the same network backwards on [LR, z ~ N(0, 1)].

The network works in [0, 1] as IRN's does (the losses too), so its loss balance and the N(0, 1) draw mean
what they mean in IRN; ``downscale`` / ``upscale`` speak the contract's [-1, 1].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from tadm.contracts import RESCALERS, Distance, Rescaler, quantize_8bit
from tadm.ops.blocks import HaarDownsampling, InvertibleNet
from tadm.ops.images import bicubic_down

#: IRN's Charbonnier epsilon in its "l1" reconstruction loss
CHARBONNIER_EPS = 1e-6


@RESCALERS.register("irn")
class IRN(Rescaler):
    """IRN-style invertible rescaler in pixel space: Haar + affine couplings per x2 stage, z ~ N(0,1) up."""

    space = "pixel"

    def __init__(
        self,
        scale: int = 16,
        num_couplings: int | list[int] = 8,
        coupling_growth: int = 32,
        z_temperature: float = 1.0,
        quantization: Literal["ste", "noise"] = "ste",
        eval_seed: int | None = 0,
    ) -> None:
        """
        Args:
            scale: HR -> LR factor; log2(scale) x2 stages are stacked (4 at x16, 5 at x32).
            num_couplings: affine couplings after each Haar stage: one number for every stage (IRN: 8),
                or one per stage, first (full resolution) to last.
            coupling_growth: growth of the dense blocks inside each coupling (IRN: 32).
            z_temperature: standard deviation of the high-frequency draw when upscaling (IRN's
                ``gaussian_scale``: 1; 0 upscales with z = 0, deterministic).
            quantization: training-time 8-bit proxy of the LR image: ``ste`` (IRN's straight-through
                rounding) or ``noise``. Evaluation always rounds.
            eval_seed: in eval mode, z is drawn from a generator seeded with this on every call, so the
                same LR image always gives the same HR image (``tadm upscale`` twice, reports); ``None``
                draws from the global RNG. Training always draws from the global RNG.
        """
        super().__init__(scale)
        stages = int(math.log2(scale))
        counts = [num_couplings] * stages if isinstance(num_couplings, int) else list(num_couplings)
        if len(counts) != stages or any(n < 0 for n in counts):
            raise ValueError(
                f"num_couplings needs one count >= 0 per x2 stage ({stages} at x{scale}), got {num_couplings}"
            )
        if z_temperature < 0:
            raise ValueError(f"z_temperature must be >= 0, got {z_temperature}")
        if quantization not in ("ste", "noise"):
            raise ValueError(f"unknown quantization {quantization!r}; choose 'ste' or 'noise'")
        self.z_temperature = z_temperature
        self.quantization = quantization
        self.eval_seed = eval_seed
        self.haar = HaarDownsampling()
        self.stages = nn.ModuleList(
            InvertibleNet(n, channels=3 * 4 ** (i + 1), split=3, growth=coupling_growth)
            for i, n in enumerate(counts)
        )

    # ------------------------------------------------------------------ the invertible network, in [0, 1]
    def forward_net(self, u: Tensor) -> Tensor:
        """HR image in [0, 1] -> (B, 3 * scale^2, H/s, W/s): the LR channels first, then z."""
        h, w = u.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {self.scale}; pad it first")
        for net in self.stages:
            u = net(self.haar(u))
        return u

    def inverse_net(self, v: Tensor) -> Tensor:
        """The exact inverse of :meth:`forward_net`."""
        for net in reversed(self.stages):
            v = self.haar.inverse(net.inverse(v))
        return v

    def draw_z(self, y: Tensor) -> Tensor:
        """The high-frequency part for an LR batch: N(0, z_temperature^2), seeded in eval mode."""
        b, _, h, w = y.shape
        shape = (b, 3 * (self.scale**2 - 1), h, w)
        if self.z_temperature == 0:
            return y.new_zeros(shape)
        generator = None
        if not self.training and self.eval_seed is not None:
            generator = torch.Generator(device=y.device).manual_seed(self.eval_seed)
        z = torch.randn(shape, generator=generator, device=y.device, dtype=y.dtype)
        return z * self.z_temperature

    # ------------------------------------------------------------------ the Rescaler contract, in [-1, 1]
    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.forward_net((x + 1.0) / 2.0)
        return v[:, :3], v[:, 3:]

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        lr, _ = self._split(x)
        return quantize_8bit(lr * 2.0 - 1.0, self.training, self.quantization)

    def upscale_noise(self, y: Tensor) -> Tensor | None:
        """z for the whole LR batch (tiles then share one field); None at z_temperature 0 (z = 0)."""
        return None if self.z_temperature == 0 else self.draw_z(y)

    def upscale(self, y: Tensor, noise: Tensor | None = None) -> Tensor:
        """LR image (and its z, else drawn here) -> HR image (not clamped: the pipeline clamps it)."""
        z = self.draw_z(y) if noise is None else noise
        if z.shape[-2:] != y.shape[-2:] or z.shape[:2] != (y.shape[0], 3 * (self.scale**2 - 1)):
            raise ValueError(f"z of shape {tuple(z.shape)} does not fit the LR batch {tuple(y.shape)}")
        v = torch.cat([(y + 1.0) / 2.0, z], dim=1)
        return self.inverse_net(v) * 2.0 - 1.0

    def training_losses(
        self, x: Tensor, z: Tensor | None, distance: Distance, outputs: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """IRN's three terms in its [0, 1] units, each IRN's weighted per-image sum divided by the HR
        element count 3HW, so IRN's balance (``lambda_fit = scale^2``, 1, 1) is weights 1, 1, 1 here:

        - ``lr``: mean squared error of the continuous LR output against the bicubic LR image (LR guidance;
          IRN's scale^2-weighted sum over the LR pixels is 3HW times it);
        - ``reconstruction``: Charbonnier L1 of the HR image rebuilt from the quantised LR and a fresh z;
        - ``distribution``: sum of z^2 (the negative log-likelihood of z under N(0, 1), up to a constant).

        IRN fixes its distances, so ``distance`` (the model's choice for the DFRM) is not used.
        The reconstruction goes to ``outputs["z_hat"]`` (for a pixel rescaler, an image) for stage 3.
        """
        lr, hf = self._split(x)
        y = quantize_8bit(lr * 2.0 - 1.0, self.training, self.quantization)
        x_hat = self.upscale(y)
        if outputs is not None:
            outputs["z_hat"] = x_hat
        n = x.numel()
        target = (bicubic_down(x, self.scale) + 1.0) / 2.0
        diff = (x_hat - x) / 2.0
        return {
            "lr": (lr - target).pow(2).mean(),
            "reconstruction": torch.sqrt(diff * diff + CHARBONNIER_EPS).mean(),
            "distribution": hf.pow(2).sum() / n,
        }
