"""A random stand-in for torchvision's ImageNet VGG16 weights, so LPIPS / DISTS build offline.

The file goes where torchvision looks (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``), so the
production code loads it exactly as it would load the real weights: no test switch in tadm. Only
the convolutions (which LPIPS and DISTS use) are random; the 120 M classifier weights are one
broadcast zero each, which keeps the file at ~60 MB. Numbers computed with it are not perceptual.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tadm.evaluation.perceptual import VGG16_FILE


def write_random_vgg16(torch_home: Path, seed: int = 0) -> Path:
    """Write the stand-in under ``torch_home`` (use it as ``TORCH_HOME``); returns the file."""
    import torchvision

    path = torch_home / "hub" / "checkpoints" / VGG16_FILE
    if path.is_file():
        return path
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if not key.startswith("features."):
            state[key] = torch.zeros(1).expand(shape)  # classifier: unused by LPIPS / DISTS
        elif key.endswith("weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
