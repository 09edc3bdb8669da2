"""LPIPS (VGG) from ``lpips`` and DISTS from ``torchmetrics``: the stage-2/3 losses and the metrics.

Both need torchvision's ImageNet VGG16 weights from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``). Offline without them we stop with a message
naming the file and how to provide it.

Both networks are built without drawing random initial weights: every weight is then loaded from a file,
and VGG16's 138 M draws (120 M of them a classifier neither keeps) cost about a second per network, at
every ``tadm fit`` and ``tadm evaluate`` start and in every test that builds a stage-2/3 model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILE = "vgg16-397923af.pth"


def vgg16_weights_path() -> Path:
    """Where torchvision looks for (and downloads) the ImageNet VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _missing_weights_error(what: str, err: Exception) -> FileNotFoundError:
    path = vgg16_weights_path()
    return FileNotFoundError(
        f"{what} needs torchvision's ImageNet VGG16 weights, expected at '{path}' "
        f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}), and they could not be downloaded here "
        f"({type(err).__name__}: {err}). Fix: on a connected machine run "
        "`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and copy "
        f"{VGG16_FILE} from its ~/.cache/torch/hub/checkpoints/ to '{path.parent}/'."
    )


_INIT_LOCK = threading.Lock()


@contextmanager
def weights_loaded_later() -> Iterator[None]:
    """Skip ``torch.nn.init``'s random draws in this thread while building networks whose every parameter
    is loaded from a file afterwards (what is not loaded stays uninitialised: only for such networks).

    ``torch.nn.init`` is shared by the process, so other threads keep the real draws (the patch checks the
    thread) and one lock keeps two builders from restoring each other's patches.
    tests/evaluation/test_perceptual.py checks the nets equal normally built ones, tensor for tensor."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    owner = threading.get_ident()

    def skip_here(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def init_or_skip(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
            if threading.get_ident() == owner:
                return tensor
            return original(tensor, *args, **kwargs)

        return init_or_skip

    with _INIT_LOCK:
        originals = {n: getattr(init, n) for n in names}
        try:
            for name, original in originals.items():
                setattr(init, name, skip_here(original))
            yield
        finally:
            for name, original in originals.items():
                setattr(init, name, original)


class PerceptualLoss(nn.Module):
    """``w_lpips * LPIPS_vgg + w_dists * DISTS`` on images in [-1, 1]; frozen networks, always in eval mode."""

    def __init__(self, lpips_weight: float = 5.0, dists_weight: float = 5.0) -> None:
        super().__init__()
        self.lpips_weight, self.dists_weight = lpips_weight, dists_weight
        self.lpips: nn.Module | None = None
        self.dists: nn.Module | None = None
        if lpips_weight:
            import lpips

            try:
                with weights_loaded_later():  # torchvision loads VGG16, lpips its linear heads
                    self.lpips = lpips.LPIPS(net="vgg", pretrained=True, verbose=False)
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                raise _missing_weights_error("LPIPS (vgg)", err) from err
        if dists_weight:
            from torchmetrics.functional.image.dists import DISTSNetwork

            try:
                with weights_loaded_later():  # VGG16 and alpha/beta (drawn by Tensor.normal_, then loaded)
                    self.dists = DISTSNetwork(load_weights=True)
            except (OSError, RuntimeError) as err:
                raise _missing_weights_error("DISTS", err) from err
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen metric networks: always in eval mode

    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.lpips is not None:
            terms["lpips"] = self.lpips(pred.float(), target.float()).mean()
        if self.dists is not None:
            p01, t01 = (pred.float() + 1) / 2, (target.float() + 1) / 2
            terms["dists"] = self.dists(p01, t01, require_grad=True).mean()
        return terms
