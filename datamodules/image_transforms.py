"""What the data modules do to a decoded image: mirror padding to a size, training crops and flips, and
the crop augmentations (:class:`CropAugment`: shuffled channels, synthetic flat colours and gradients, faint
crops) that teach a small training set colours and contrasts it never showed. Shared by the image-folder
and WebDataset data modules and by ``tadm shard``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def reflect_pad(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mirror-pad a (C, H, W) tensor, centered, up to at least ``height`` x ``width``.

    ``torch.nn.functional.pad(mode="reflect")`` refuses pads wider than the image; this repeats the
    reflection as often as needed (like ``numpy.pad(mode="reflect")``), so a 30-pixel image still becomes a
    256 crop. Mirroring keeps local statistics natural, unlike zero or constant padding.
    """
    _, h, w = image.shape
    if h < height:
        image = image.index_select(1, _reflect_indices(h, height))
    if w < width:
        image = image.index_select(2, _reflect_indices(w, width))
    return image


def _reflect_indices(size: int, target: int) -> torch.Tensor:
    """Source index for each of ``target`` positions, the ``size`` originals centered among them."""
    if size == 1:
        return torch.zeros(target, dtype=torch.long)
    period = 2 * (size - 1)
    k = (torch.arange(target) - (target - size) // 2).remainder(period)
    return torch.where(k >= size, period - k, k)


def random_crop_flip(
    image: torch.Tensor, crop_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random ``crop_size`` square (after mirror-padding small images) and a coin-flip horizontal flip,
    drawn from ``generator`` (default: torch's global RNG)."""
    image = reflect_pad(image, crop_size, crop_size)
    _, h, w = image.shape
    top = int(torch.randint(0, h - crop_size + 1, (), generator=generator).item())
    left = int(torch.randint(0, w - crop_size + 1, (), generator=generator).item())
    crop = image[:, top : top + crop_size, left : left + crop_size]
    if bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop.contiguous()


def shuffle_channels(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The RGB channels in a random order (uniform over the 6): hues move to other hue families while
    brightness structure, texture and saturation stay those of a real photo."""
    return image[torch.randperm(3, generator=generator)].contiguous()


def smooth_field(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``size`` square in [-1, 1] that is flat (half the time) or a bilinear gradient between four
    corner colours, each channel drawn uniformly and, with probability 1/2, pushed to the nearest end
    of its range: saturated primaries and secondaries, black and white are as likely as mid tones."""
    n = 1 if bool(torch.rand((), generator=generator) < 0.5) else 2
    corners = torch.rand(3, n, n, generator=generator) * 2 - 1
    saturate = torch.rand(3, n, n, generator=generator) < 0.5
    corners = torch.where(saturate, corners.sign(), corners)
    field = torch.nn.functional.interpolate(
        corners[None], size=(size, size), mode="bilinear", align_corners=True
    )
    return field[0].clamp(-1.0, 1.0).contiguous()


def reduce_contrast(
    image: torch.Tensor, generator: torch.Generator | None = None, min_factor: float = 1 / 16
) -> torch.Tensor:
    """``image`` (C, H, W) with its deviations from each channel's mean scaled by a factor drawn
    log-uniformly from [``min_factor``, 1/2]: the same colours, structure and noise at a fraction of the
    amplitude. Misty, dusky and night photos are mostly this; at x16 a code error of a tenth of a grey
    level is then what costs PSNR against bicubic, and photos alone rarely show a model such crops."""
    if not 0.0 < min_factor <= 0.5:
        raise ValueError(f"min_factor must be in (0, 1/2], got {min_factor}")
    lo, hi = torch.tensor(min_factor).log2(), torch.tensor(0.5).log2()
    factor = torch.exp2(lo + (hi - lo) * torch.rand((), generator=generator))
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return (mean + factor * (image - mean)).contiguous()


@dataclass(frozen=True)
class CropAugment:
    """What happens to a training crop after cropping and flipping, each step drawn from ``generator``:

    Attributes:
        color_augment: shuffle the crop's RGB channels at random (one of the 6 orders,
            :func:`shuffle_channels`): a few photos then cover every hue family, so a model does not learn
            colours it never saw as something to distort.
        smooth_fraction: this share of the crops is replaced by a smooth synthetic image
            (:func:`smooth_field`: flat colours and gradients over the whole RGB cube, saturated ones
            included), so a model learns to leave flat and slowly varying areas alone.
        low_contrast_fraction: this share of the photo crops (after ``smooth_fraction``'s draw) has its
            contrast cut to between ``low_contrast_min`` and 1/2 around its mean (:func:`reduce_contrast`),
            so a model sees the faint detail of misty, dusky and night photos, where a model's own small
            errors cost more PSNR than the missing detail.
        low_contrast_min: the smallest contrast factor (log-uniform up to 1/2).

    A share of 0 draws nothing from the generator, so recipes without a step keep their crops.
    """

    color_augment: bool = False
    smooth_fraction: float = 0.0
    low_contrast_fraction: float = 0.0
    low_contrast_min: float = 1 / 16

    def __post_init__(self) -> None:
        for label, share in (
            ("smooth_fraction", self.smooth_fraction),
            ("low_contrast_fraction", self.low_contrast_fraction),
        ):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {share}")
        if not 0.0 < self.low_contrast_min <= 0.5:
            raise ValueError(f"low_contrast_min must be in (0, 1/2], got {self.low_contrast_min}")

    def __call__(self, crop: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented (3, S, S) crop."""
        if self.smooth_fraction and bool(torch.rand((), generator=generator) < self.smooth_fraction):
            return smooth_field(crop.shape[-1], generator)
        if self.color_augment:
            crop = shuffle_channels(crop, generator)
        share = self.low_contrast_fraction
        if share and bool(torch.rand((), generator=generator) < share):
            crop = reduce_contrast(crop, generator, self.low_contrast_min)
        return crop
