"""The metric networks of ``tadm evaluate``, built once: PSNR-Y / SSIM-Y under a protocol, LPIPS / DISTS and
the features of FID / KID, for one image pair at a time.

A module of its own because two callers share it: :mod:`tadm.evaluation.engine` (``tadm evaluate``: it times
the methods and writes the report) and ``tadm demo``, which scores one photo with the same :class:`Metrics`
so that its numbers are ``tadm evaluate``'s.

- PSNR-Y / SSIM-Y under a protocol (:mod:`tadm.evaluation.protocols`: ``tadm``, ``pyiqa`` or ``basicsr``).
- LPIPS (VGG) and DISTS (:mod:`tadm.evaluation.perceptual`); a GPU out-of-memory error retries on the CPU.
- The Inception of FID and KID (:mod:`tadm.evaluation.fid`) when ``torch-fidelity`` and its weights are present;
  otherwise both are reported as ``n/a`` with the reason (:class:`MetricUnavailableWarning`).

Every metric sees both images rounded to 8 bits, i.e. what a saved PNG would hold.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from tadm.evaluation import fid
from tadm.evaluation.fid import FID_WEIGHTS_FILE, FID_WEIGHTS_URL, fid_weights_path
from tadm.evaluation.protocols import Protocol, TadmProtocol
from tadm.ops.images import quantize_unit_8bit, to_unit

#: LPIPS / DISTS pool VGG features 4-5 times: smaller images have no score
MIN_PERCEPTUAL_SIDE = 32


class MetricUnavailableWarning(UserWarning):
    """A metric cannot be computed in this environment (missing package or weights); it is reported n/a."""


class Metrics:
    """The metric networks, built once and reused for every image and method.

    Args:
        device: Where the networks run; :func:`~tadm.evaluation.engine.evaluate` also hands images to the
            methods there (use the model's device).
        perceptual: Compute LPIPS (VGG) and DISTS. Offline they need torchvision's VGG16 ImageNet weights
            in ``$TORCH_HOME/hub/checkpoints/``; missing weights raise an error naming the file.
        fid: Compute FID and KID when possible (package ``torch-fidelity`` and its Inception weights);
            otherwise warn once with the reason and report both as n/a.
        fid_weights: Explicit path of the FID Inception weights (default: the torch hub cache).
        fid_feature: A feature network used instead of FID's Inception (uint8 (B,3,H,W) -> (B,D)), e.g. a
            DINOv2 or CLIP encoder for a Frechet distance in its feature space; the summary then says that
            the value is not comparable with Inception FIDs (KID uses the same features).
        protocol: How PSNR-Y / SSIM-Y are computed (:func:`tadm.evaluation.protocols.get_protocol`); default
            ``tadm``'s own.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        perceptual: bool = True,
        fid: bool = True,
        fid_weights: str | os.PathLike[str] | None = None,
        fid_feature: nn.Module | None = None,
        protocol: Protocol | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.protocol = protocol or TadmProtocol()
        self.not_computed: dict[str, str] = {}
        """Metric group ("LPIPS/DISTS", "FID/KID") -> why it is not computed; the summary prints these."""
        self.caveats: list[str] = []
        self._perceptual: nn.Module | None = None
        self._perceptual_cpu: nn.Module | None = None
        if perceptual:
            from tadm.evaluation.perceptual import PerceptualLoss

            try:
                net = PerceptualLoss(1.0, 1.0)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err} To evaluate without LPIPS/DISTS, turn them off.") from err
            self._perceptual = net.to(self.device)
        else:
            self.not_computed["LPIPS/DISTS"] = "turned off"
        self._fid: nn.Module | None = None
        if fid_feature is not None:
            self._fid = fid_feature.to(self.device).eval()
            self.caveats.append(
                f"FID and KID use the feature network {type(fid_feature).__name__} instead of Inception: "
                "not comparable with published FIDs and KIDs."
            )
        elif fid:
            self._fid = self._build_fid(None if fid_weights is None else str(fid_weights))
        else:
            self.not_computed["FID/KID"] = "turned off"

    @property
    def perceptual(self) -> bool:
        return self._perceptual is not None

    @property
    def fid(self) -> bool:
        return self._fid is not None

    def _build_fid(self, weights: str | None) -> nn.Module | None:
        target = weights or str(fid_weights_path())
        try:
            net = fid.load_fid_inception(weights)
        except ModuleNotFoundError:
            reason = (
                "the package torch-fidelity is not installed (torchmetrics' FID needs it): "
                "`pip install 'tadm[fid]'` or `pip install torch-fidelity`"
            )
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            reason = (
                f"torch-fidelity's FID Inception weights are missing or unreadable: looked for '{target}' "
                f"({type(err).__name__}: {err}). Download {FID_WEIGHTS_URL} on a connected machine and copy "
                f"{FID_WEIGHTS_FILE} to '{Path(target).parent}/'"
            )
        else:
            return net.to(self.device).eval()
        self.not_computed["FID/KID"] = reason
        warnings.warn(f"FID and KID are not computed: {reason}", MetricUnavailableWarning, stacklevel=3)
        return None

    @torch.no_grad()
    def image(self, pred: Tensor, target: Tensor) -> dict[str, float | None]:
        """PSNR-Y and SSIM-Y (under the protocol), LPIPS and DISTS (None when off) of one (1,3,H,W) pair in
        [-1, 1]."""
        p, t = _as_8bit(pred.to(self.device)), _as_8bit(target.to(self.device))
        with _fp32(self.device):
            values: dict[str, float | None] = {
                "psnr_y": float(self.protocol.psnr_y(p, t)[0]),
                "ssim_y": float(self.protocol.ssim_y(p, t)[0]),
                "lpips": None,
                "dists": None,
            }
            if self._perceptual is not None and min(p.shape[-2:]) >= MIN_PERCEPTUAL_SIDE:
                values["lpips"], values["dists"] = self._perceptual_values(p, t)
            elif self._perceptual is not None:
                note = (
                    f"LPIPS/DISTS are undefined for images under {MIN_PERCEPTUAL_SIDE} px (VGG pooling): "
                    "left empty for such images and out of the means"
                )
                if note not in self.caveats:
                    self.caveats.append(note)
        return values

    def _perceptual_values(self, p: Tensor, t: Tensor) -> tuple[float, float]:
        """LPIPS and DISTS; a GPU out-of-memory error (8K images) retries the image on the CPU."""
        assert self._perceptual is not None
        try:
            return _lpips_dists(self._perceptual, p, t)
        except torch.cuda.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
        torch.cuda.empty_cache()
        if self._perceptual_cpu is None:
            warnings.warn(
                f"LPIPS/DISTS ran out of memory on {self.device} for a {p.shape[-2]}x{p.shape[-1]} image; "
                "such images are scored on the CPU (slower, same values)",
                stacklevel=3,
            )
            self._perceptual_cpu = copy.deepcopy(self._perceptual).cpu()
        return _lpips_dists(self._perceptual_cpu, p.cpu(), t.cpu())

    @torch.no_grad()
    def fid_features(self, images: Tensor) -> Tensor | None:
        """FID features (B, D) of images in [-1, 1], as float64 on the CPU; None when FID is off."""
        if self._fid is None:
            return None
        u8 = (quantize_unit_8bit(to_unit(images.to(self.device).float())) * 255).round().to(torch.uint8)
        with _fp32(self.device):
            return self._fid(u8).double().cpu()


def _as_8bit(x: Tensor) -> Tensor:
    return quantize_unit_8bit(to_unit(x.float())) * 2.0 - 1.0


def _lpips_dists(net: nn.Module, p: Tensor, t: Tensor) -> tuple[float, float]:
    lpips_value = net.lpips(p, t).flatten()[0]
    dists_value = net.dists((p + 1) / 2, (t + 1) / 2).flatten()[0]
    return float(lpips_value), float(dists_value)


def _fp32(device: torch.device) -> torch.autocast:
    """Autocast off, in case the caller runs the model under mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)
