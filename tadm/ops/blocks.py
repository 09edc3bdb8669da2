"""Network blocks shared by the DFRM, the TPM, the Refiner and IRN: conv/res blocks, exact affine couplings
and the Haar downsampling."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class ConvBlock(nn.Sequential):
    """3x3 conv + LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1))


Activation = Literal["leaky_relu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "relu")


class ResBlock(nn.Module):
    """conv - activation - conv + identity.

    ``leaky_relu`` (LeakyReLU(0.1), PyTorch's default init) is tadm's; ``relu`` is the authors'
    release's TPM / Refiner block (BasicSR's ``ResidualBlockNoBN``: ReLU, kaiming-normal init x 0.1,
    zero biases). Both have the same parameters (``body.0`` / ``body.2``), so a checkpoint loads into
    either; only the arithmetic differs.
    """

    def __init__(self, channels: int, activation: Activation = "leaky_relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown block activation {activation!r}; choose one of {list(ACTIVATIONS)}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.LeakyReLU(0.1) if activation == "leaky_relu" else nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        if activation == "relu":
            for conv in (self.body[0], self.body[2]):
                nn.init.kaiming_normal_(conv.weight)
                conv.weight.data.mul_(0.1)
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DenseBlock(nn.Module):
    """Five densely connected 3x3 convs (growth ``growth``), the coupling sub-network.

    The last conv is zero-initialised so every coupling starts as the identity map; the others
    get Xavier init scaled by 0.1 (as in IRN/TADM) for a stable start.
    """

    def __init__(self, cin: int, cout: int, growth: int = 32) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin + i * growth, growth, 3, padding=1) for i in range(4))
        self.out = nn.Conv2d(cin + 4 * growth, cout, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        for conv in self.convs:
            nn.init.xavier_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, dim=1))))
        return self.out(torch.cat(feats, dim=1))


class AffineCoupling(nn.Module):
    """Exactly invertible affine coupling on channels split ``split | rest``.

    y1 = x1 + f(x2);  s = clamp * (2 sigmoid(h(y1)) - 1);  y2 = x2 * exp(s) + g(y1).
    """

    def __init__(self, channels: int = 3, split: int = 1, growth: int = 32, clamp: float = 1.0) -> None:
        super().__init__()
        self.split = split
        self.clamp = clamp
        rest = channels - split
        self.f = DenseBlock(rest, split, growth)
        self.g = DenseBlock(split, rest, growth)
        self.h = DenseBlock(split, rest, growth)

    def _scale(self, y1: Tensor) -> Tensor:
        return self.clamp * (torch.sigmoid(self.h(y1)) * 2.0 - 1.0)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        y1 = x1 + self.f(x2)
        y2 = x2 * torch.exp(self._scale(y1)) + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[:, : self.split], y[:, self.split :]
        x2 = (y2 - self.g(y1)) * torch.exp(-self._scale(y1))
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)


class InvertibleNet(nn.Module):
    """A stack of affine couplings: ``forward`` maps z_lr to the LR image, ``inverse`` back."""

    def __init__(self, num_blocks: int = 12, channels: int = 3, split: int = 1, growth: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AffineCoupling(channels, split, growth) for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


class HaarDownsampling(nn.Module):
    """One level of the 2-D Haar transform as an exactly invertible x2 downsampling (IRN's).

    (B, C, H, W) -> (B, 4C, H/2, W/2), grouped by filter: the C low-pass channels (2x2 means) first,
    then the three detail bands, each C channels. The forward pass divides by 4 as IRN does (so the
    low-pass band is a box-downsampled image in the input's units); ``inverse`` undoes it exactly.
    """

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(f"Haar downsampling needs even sizes, got {h}x{w}")
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        return torch.cat([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], dim=1) / 4.0

    def inverse(self, y: Tensor) -> Tensor:
        if y.shape[1] % 4:
            raise ValueError(f"Haar inverse needs 4C channels, got {y.shape[1]}")
        ll, h1, h2, h3 = y.chunk(4, dim=1)
        a, b = ll + h1 + h2 + h3, ll - h1 + h2 - h3
        c, d = ll + h1 - h2 - h3, ll - h1 - h2 + h3
        # pixel_shuffle reads channel (k * 4 + 2i + j) as pixel (i, j) of channel k
        out = torch.stack([a, b, c, d], dim=2).flatten(1, 2)
        return torch.nn.functional.pixel_shuffle(out, 2)
