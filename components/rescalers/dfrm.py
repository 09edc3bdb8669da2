"""DFRM, TADM's Decoupled Feature Rescaling Module (the "pseudo-invertible" rescaler).

Encoder G_e fuses a pixel branch (HR image) and a latent branch (backbone latent) into a
3-channel z_lr at H/s; an invertible net F turns z_lr into the LR image y (quantised to 8 bits);
decoder G_d maps F^-1(y) back to a latent at H/f (f = the backbone's downsampling, 8 for SD).
Defaults reproduce the authors' release (12.2 M parameters at x16, 18.1 M at x32).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.contracts import RESCALERS, Distance, Rescaler, quantize_8bit
from tadm.ops.blocks import ConvBlock, InvertibleNet, ResBlock
from tadm.ops.images import bicubic_down, bicubic_resize


def _log2_int(value: int, what: str) -> int:
    n = int(math.log2(value)) if value > 0 else -1
    if n < 0 or 2**n != value:
        raise ValueError(f"{what} must be a power of two, got {value}")
    return n


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 3x3 conv that outputs exactly 0 at initialisation (a residual branch that starts switched off)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


@RESCALERS.register("dfrm")
class DFRM(Rescaler):
    """TADM's decoupled feature rescaling module: HR image + latent -> 8-bit LR -> latent."""

    space = "latent"

    def __init__(
        self,
        scale: int = 16,
        latent_channels: int = 4,
        latent_factor: int = 8,
        width: int = 128,
        num_resblocks: int = 8,
        pixel_width: int = 16,
        num_couplings: int = 12,
        coupling_growth: int = 32,
        final_activation: bool = False,
        quantization: Literal["noise", "ste"] = "noise",
        bicubic_skip: bool = False,
        detail_residual: bool = False,
        latent_scaling: float = 1.0,
        lr_guidance: Literal["antialias", "plain"] = "antialias",
        unscaled_latents: bool = False,
    ) -> None:
        """
        Args:
            scale: HR -> LR downscaling factor (16 or 32 in the paper; any power of two >= 2*latent_factor).
            latent_channels: channels of the backbone latent (4 for SD VAEs); linked from the backbone.
            latent_factor: spatial downsampling of the backbone latent (8 for SD); linked from the backbone.
            width: channels of the latent branch and of G_d (128 in the paper).
            num_resblocks: ResBlocks in the latent branch, the fusion and G_d (8 in the paper).
            pixel_width: first/last channels of the pixel branch (16 in the paper).
            num_couplings: affine coupling blocks in the invertible net F (12 in the paper).
            coupling_growth: growth of the dense blocks inside each coupling (32 in the paper).
            final_activation: end G_d with LeakyReLU as the authors' release does. Off by default:
                a latent is signed and unbounded, so a plain final conv is the sensible output layer.
            quantization: training-time 8-bit proxy: ``noise`` (uniform noise, the paper) or ``ste``
                (straight-through rounding). Evaluation always rounds.
            bicubic_skip: learn residuals over bicubic, both ways (beyond the paper; for latents that
                are a pixel layout, such as the embedded ``space_to_depth`` backbone's): z_lr is the
                bicubic LR image plus a zero-initialised residual, and G_d adds its zero-initialised
                output to the latent of the bicubic upscale of its input. Training thus starts exactly
                at bicubic down + up, and what is learned is detail on top of it, which generalises to
                photos unlike the training ones far better than rebuilding every pixel.
            detail_residual: with ``bicubic_skip``, take from G_d's residual r (in image space) the
                bicubic upscale of its means over scale x scale blocks: what is left is detail, with
                no colour or brightness of its own (a flat or block-periodic r is removed exactly, a
                smooth one nearly). Flat colours and smooth gradients then come back as the bicubic
                upscale of the LR code has them, whatever colours the training photos had, and the
                network spends itself on detail.
            latent_scaling: the backbone's latent multiplier (linked from it); used by ``bicubic_skip`` and
                ``unscaled_latents``.
            lr_guidance: the LR image's target in the ``lr`` loss term: ``antialias`` (tadm: antialiased
                bicubic, a proper small version of the photo) or ``plain`` (the release:
                ``F.interpolate(mode="bicubic")`` without antialiasing, clamped to [-1, 1]; it aliases at
                x16/x32). Metrics and the bicubic baseline always use the antialiased one.
            unscaled_latents: the release's convention after stage 1: its DFRM reads the RAW VAE latent
                (``DFRM.inference`` divides the scaled latent by 0.18215) and the latent it rebuilds is
                taken as raw too (``tadm.py`` multiplies it by the scaling factor before the UNet). On, the
                latent branch gets z / latent_scaling and G_d's output is multiplied by latent_scaling, so
                everything outside the DFRM stays scaled. The release trains stage 1 on scaled latents
                (off) and runs stages 2/3 and inference this way (on); ``configs/experiments/release/``
                does the same.
        """
        super().__init__(scale)
        steps = _log2_int(scale, "scale")
        lat_steps = steps - _log2_int(latent_factor, "latent_factor")
        if lat_steps < 1:
            raise ValueError(
                f"DFRM needs scale > latent_factor; got scale {scale}, latent_factor {latent_factor}"
            )
        if bicubic_skip and latent_channels != 3 * latent_factor**2:
            raise ValueError(
                f"bicubic_skip needs a pixel-layout latent (3 x {latent_factor}^2 = {3 * latent_factor**2} "
                f"channels, as space_to_depth gives); this backbone's latent has {latent_channels}"
            )
        if bicubic_skip and final_activation:
            raise ValueError(
                "bicubic_skip adds G_d's output to a base latent: it needs final_activation: false"
            )
        if detail_residual and not bicubic_skip:
            raise ValueError("detail_residual filters bicubic_skip's residual: it needs bicubic_skip: true")
        if bicubic_skip and unscaled_latents:
            raise ValueError("bicubic_skip and unscaled_latents exclude each other (choose one convention)")
        if lr_guidance not in ("antialias", "plain"):
            raise ValueError(f"unknown lr_guidance {lr_guidance!r}; choose 'antialias' or 'plain'")
        self.latent_channels = latent_channels
        self.latent_factor = latent_factor
        self.quantization = quantization
        self.bicubic_skip = bicubic_skip
        self.detail_residual = detail_residual
        self.latent_scaling = latent_scaling
        self.lr_guidance = lr_guidance
        self.unscaled_latents = unscaled_latents

        # G_e pixel branch: ConvBlock 3->16, log2(s) x [PixelUnshuffle(2), 1x1 conv 4C->2C, ResBlock], ConvBlock ->16
        layers: list[nn.Module] = [ConvBlock(3, pixel_width)]
        c = pixel_width
        for _ in range(steps):
            layers += [nn.PixelUnshuffle(2), nn.Conv2d(4 * c, 2 * c, 1), ResBlock(2 * c)]
            c *= 2
        layers.append(ConvBlock(c, pixel_width))
        self.pixel_branch = nn.Sequential(*layers)

        # G_e latent branch: ConvBlock C->128, 8 ResBlocks, then per extra factor 2: PixelUnshuffle + ConvBlock 512->128
        layers = [ConvBlock(latent_channels, width), *(ResBlock(width) for _ in range(num_resblocks))]
        for _ in range(lat_steps):
            layers += [nn.PixelUnshuffle(2), ConvBlock(4 * width, width)]
        self.latent_branch = nn.Sequential(*layers)

        # Fusion -> z_lr (3 channels at H/s)
        fused = width + pixel_width
        head = _zero_conv(fused, 3) if bicubic_skip else ConvBlock(fused, 3)  # skip: a residual, 0 at start
        self.fusion = nn.Sequential(*(ResBlock(fused) for _ in range(num_resblocks)), head)

        # G_d: ConvBlock 3->128, 8 ResBlocks, then PixelShuffle steps back to H/f and a final conv -> C
        layers = [ConvBlock(3, width), *(ResBlock(width) for _ in range(num_resblocks))]
        c = width
        for i in range(lat_steps):
            layers.append(nn.PixelShuffle(2))
            c //= 4
            if i < lat_steps - 1:
                layers.append(ConvBlock(c, c))
        if bicubic_skip:
            layers.append(_zero_conv(c, latent_channels))
        else:
            layers.append(
                ConvBlock(c, latent_channels)
                if final_activation
                else nn.Conv2d(c, latent_channels, 3, padding=1)
            )
        self.decoder = nn.Sequential(*layers)

        self.invertible = InvertibleNet(num_couplings, channels=3, split=1, growth=coupling_growth)

    def _check(self, x: Tensor, z: Tensor | None) -> Tensor:
        if z is None:
            raise ValueError("DFRM needs the backbone latent z of the HR image")
        h, w = x.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {self.scale}; pad it first")
        expected = (self.latent_channels, h // self.latent_factor, w // self.latent_factor)
        if tuple(z.shape[1:]) != expected:
            raise ValueError(
                f"latent shape {tuple(z.shape[1:])} does not match {expected} for an HR image {h}x{w}"
            )
        return z

    def encode_lr(self, x: Tensor, z: Tensor | None) -> Tensor:
        """G_e: the continuous 3-channel z_lr before the invertible net (with ``bicubic_skip``: the
        bicubic LR image plus the learned residual)."""
        z = self._check(x, z)
        if self.unscaled_latents:
            z = z / self.latent_scaling
        z_lr = self.fusion(torch.cat([self.pixel_branch(x), self.latent_branch(z)], dim=1))
        return z_lr + bicubic_down(x, self.scale) if self.bicubic_skip else z_lr

    def decode(self, u: Tensor) -> Tensor:
        """G_d: an LR-sized 3-channel code -> latent (with ``bicubic_skip``: plus the latent of the
        bicubic upscale of ``u``, the pixel layout ``space_to_depth`` uses)."""
        out = self.decoder(u)
        if self.unscaled_latents:
            return out * self.latent_scaling
        if not self.bicubic_skip:
            return out
        h, w = u.shape[-2:]
        size = (h * self.scale, w * self.scale)
        up = bicubic_resize(u, size)
        if self.detail_residual:  # r minus the bicubic upscale of its block means: no colour shift
            r = F.pixel_shuffle(out, self.latent_factor)
            r = r - F.interpolate(F.avg_pool2d(r, self.scale), size=size, mode="bicubic", align_corners=False)
            out = F.pixel_unshuffle(r, self.latent_factor)
        return out + F.pixel_unshuffle(up, self.latent_factor) * self.latent_scaling

    def lr_target(self, x: Tensor) -> Tensor:
        """The bicubic LR image the ``lr`` term pulls y towards (``lr_guidance``)."""
        if self.lr_guidance == "antialias":
            return bicubic_down(x, self.scale)
        h, w = x.shape[-2:]
        size = (h // self.scale, w // self.scale)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return quantize_8bit(self.invertible(self.encode_lr(x, z)), self.training, self.quantization)

    def upscale(self, y: Tensor) -> Tensor:
        return self.decode(self.invertible.inverse(y))

    def training_losses(
        self, x: Tensor, z: Tensor | None, distance: Distance, outputs: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Stage-1 terms: LR guidance towards bicubic, and the latent rebuilt from z_lr (forward)
        and from the quantised LR image (backward; that z_hat goes to ``outputs["z_hat"]``)."""
        z_lr = self.encode_lr(x, z)
        y = quantize_8bit(self.invertible(z_lr), self.training, self.quantization)
        z_hat = self.upscale(y)
        if outputs is not None:
            outputs["z_hat"] = z_hat
        return {
            "lr": distance(y, self.lr_target(x)),
            "latent_forward": distance(self.decode(z_lr), z),
            "latent_backward": distance(z_hat, z),
        }
