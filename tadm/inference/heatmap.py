"""Timestep maps as pictures: the TensorBoard panel of stages 2/3 and ``tadm upscale --save-timesteps``.

One place draws them, so the log and the saved file look the same: viridis over the aligner's range,
nearest-upsampled from the latent grid to the image grid and cropped to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tadm.ops.images import crop_to


def heat_map(t: Tensor, t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """(B,1,H,W) values -> (B,3,H,W) RGB in [0, 1] with a perceptually ordered (viridis-like) palette.

    ``t_min`` / ``t_max`` fix the colour range (e.g. the aligner's range); by default each map's own.
    """
    lo = t.amin(dim=(1, 2, 3), keepdim=True) if t_min is None else torch.tensor(t_min)
    hi = t.amax(dim=(1, 2, 3), keepdim=True) if t_max is None else torch.tensor(t_max)
    u = ((t.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    stops = torch.tensor(_VIRIDIS, device=t.device)  # (K, 3)
    pos = u * (len(_VIRIDIS) - 1)
    i0 = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = pos - i0
    c0, c1 = stops[i0.squeeze(1)], stops[i0.squeeze(1) + 1]  # (B,H,W,3)
    rgb = c0 + (c1 - c0) * frac.squeeze(1)[..., None]
    return rgb.permute(0, 3, 1, 2).contiguous()


#: viridis at 9 evenly spaced stops (matplotlib's values, rounded)
_VIRIDIS = [
    (0.267, 0.005, 0.329),
    (0.278, 0.175, 0.483),
    (0.230, 0.322, 0.546),
    (0.173, 0.449, 0.558),
    (0.128, 0.567, 0.551),
    (0.153, 0.680, 0.504),
    (0.362, 0.786, 0.388),
    (0.678, 0.864, 0.190),
    (0.993, 0.906, 0.144),
]


def timestep_panel(
    timesteps: Tensor, factor: int, size: tuple[int, int], t_min: float | None, t_max: float | None
) -> Tensor:
    """(B,1,h,w) timestep map on the latent grid -> (B,3,H,W) heat map in [0, 1] at the image ``size``.

    ``factor`` is the backbone's latent downsampling; ``t_min``/``t_max`` the aligner's range (None: the
    map's own range).
    """
    heat = heat_map(timesteps, t_min, t_max)
    return crop_to(F.interpolate(heat, scale_factor=factor, mode="nearest"), size)
