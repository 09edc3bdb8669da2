"""A trained model as an image codec: HR -> 8-bit LR -> HR, tiled, on any device and precision.

:func:`load_codec` rebuilds the model from the config stored in a checkpoint (Lightning ``.ckpt`` or
an exported ``.safetensors``), loads the trained weights over the frozen backbone, and returns a
:class:`Codec`. Two ids identify what a checkpoint can decode:

- ``rescaler_id``: hash of the rescaler's weights, class and scale. An LR image can be upscaled by
  any checkpoint with the same rescaler (a stage-2 model keeps its stage-1 DFRM frozen, so LR files
  written by the stage-1 checkpoint stay valid). LR files carry it; a mismatch is an error.
- ``model_id``: hash of every trained tensor as stored (provenance, written into LR files too).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor

from tadm import pipeline
from tadm.checkpoint_io import CheckpointError
from tadm.tiling import Tiling

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tensor_hash(state: dict[str, Tensor], extra: str = "") -> str:
    """Short stable hash of named tensors (names, dtypes, shapes and bytes), 16 hex digits."""
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rescaler_identity(module: Any) -> str:
    """The id LR files are checked against: the rescaler's weights, class and scale."""
    r = module.rescaler
    state = {k: v.float() for k, v in r.state_dict().items() if v.is_floating_point()}
    return tensor_hash(state, f"{type(r).__module__}.{type(r).__qualname__}|x{r.scale}")


@dataclass
class Codec:
    """A loaded model for inference: ``downscale`` HR -> 8-bit LR, ``upscale`` LR -> HR.

    ``precision`` runs the UNet, Refiner and VAE decoder under autocast (bf16 / fp16); the rescaler
    always runs in fp32 so the LR image is the same 8-bit image on every device and precision. VAEs
    flagged ``force_upcast`` (SDXL's) stay fp32 inside autocast (the backbone sees to that).
    """

    module: Any  # TADMModule (imported lazily: `tadm --help` stays fast)
    tiling: Tiling = field(default_factory=Tiling)
    precision: Precision = "fp32"
    model_id: str = ""
    rescaler_id: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {self.precision!r}")
        self.module.eval()
        if not self.rescaler_id:
            self.rescaler_id = rescaler_identity(self.module)

    @property
    def scale(self) -> int:
        return int(self.module.scale)

    @property
    def pad_multiple(self) -> int:
        """HR sizes are reflect-padded to a multiple of this before downscaling."""
        return pipeline.pad_multiple(self.module.backbone, self.module.rescaler)

    @property
    def device(self) -> torch.device:
        """Where the model lives (a weight-free model, e.g. bicubic on space_to_depth, is on the CPU)."""
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return torch.device("cpu")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    @torch.no_grad()
    def downscale(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """HR (1,3,H,W) in [-1,1] -> (8-bit LR image in [-1,1] of the padded HR image, (H, W))."""
        m = self.module
        y, size, _ = pipeline.downscale(m.backbone, m.rescaler, x.to(self.device).float(), self.tiling)
        return y, size

    @torch.no_grad()
    def upscale(self, y: Tensor, size: tuple[int, int]) -> pipeline.Upscaled:
        """LR (1,3,h,w) in [-1,1] -> HR image cropped to ``size`` (and the timestep map used)."""
        m = self.module
        if getattr(m.aligner, "needs_true_latent", False):
            raise CheckpointError(
                f"checkpoint {self.source} uses the analysis aligner {type(m.aligner).__name__}, which needs "
                "the HR image: it cannot upscale an LR file alone (use `tadm test` to evaluate it)"
            )
        return self._upscale(y.to(self.device).float(), size)

    def _upscale(self, y: Tensor, size: tuple[int, int], z_true: Tensor | None = None) -> pipeline.Upscaled:
        """The rescaler in fp32, then the enhancer and VAE decoder under the chosen precision."""
        m = self.module
        z_hat = pipeline.rescale_up(m.backbone, m.rescaler, y, self.tiling)
        with self._autocast():
            return pipeline.enhance_and_decode(
                m.backbone, m.rescaler, z_hat, size, m._enhance_fn(), self.tiling, z_true=z_true
            )

    @torch.no_grad()
    def round_trip(self, x: Tensor) -> pipeline.RoundTrip:
        """Downscale then upscale (analysis aligners get the HR latent)."""
        m = self.module
        x = x.to(self.device).float()
        y, size, z = pipeline.downscale(m.backbone, m.rescaler, x, self.tiling)
        up = self._upscale(y, size, z_true=z)
        s = self.scale
        return pipeline.RoundTrip(y, up.image, (y.shape[-2] * s, y.shape[-1] * s), up.timesteps)


def _link_free_model_parser() -> Any:
    """A parser for the ``model:`` section of a run config, with the CLI's links."""
    from lightning.pytorch.cli import LightningArgumentParser

    from tadm.cli import link_model_arguments
    from tadm.module import TADMModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(TADMModule, "model")
    link_model_arguments(parser, with_data=False)
    return parser


def build_module(config_yaml: str, source: str, backbone_pretrained: str | None = None) -> Any:
    """Rebuild the TADMModule a run config describes, for inference (no losses, no init_from)."""
    from tadm.registry import load_plugins

    load_plugins()
    cfg = yaml.safe_load(config_yaml) or {}
    model_cfg = dict(cfg.get("model") or {})
    if not model_cfg:
        raise CheckpointError(f"checkpoint {source} holds no model config; was it written by tadm?")
    model_cfg["init_from"] = None  # its weights are about to be loaded from this very checkpoint
    model_cfg["loss_weights"] = {}  # inference needs no loss networks (and no VGG weights)
    for key in ("optimizer", "lr_scheduler"):
        model_cfg.pop(key, None)
    if backbone_pretrained is not None:
        model_cfg["backbone"] = _with_pretrained(model_cfg.get("backbone"), backbone_pretrained)
    parser = _link_free_model_parser()
    try:
        ns = parser.parse_object({"model": model_cfg})
        return parser.instantiate_classes(ns).model
    except (OSError, FileNotFoundError) as err:
        backbone = (model_cfg.get("backbone") or {}).get("init_args", {})
        raise CheckpointError(
            f"checkpoint {source} needs backbone {backbone.get('preset')!r} from "
            f"{backbone.get('pretrained') or 'its preset hub id'!r}, which cannot be loaded here: {err}. "
            "Copy the backbone folder to this machine and pass --backbone /path/to/folder."
        ) from err


def _with_pretrained(backbone_cfg: Any, pretrained: str) -> dict[str, Any]:
    cfg = dict(backbone_cfg or {})
    init_args = dict(cfg.get("init_args") or {})
    init_args["pretrained"] = pretrained
    cfg["init_args"] = init_args
    return cfg


def load_codec(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    tiling: Tiling | None = None,
    backbone_pretrained: str | None = None,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> Codec:
    """Load a checkpoint for inference.

    Args:
        ckpt: a Lightning checkpoint of any stage or an exported ``.safetensors`` (``tadm export``).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for UNet, Refiner and VAE decoder.
        tiling: tile sizes (default: TADM's, see :class:`tadm.tiling.Tiling`).
        backbone_pretrained: load the frozen backbone from this folder / hub id instead of the one the
            checkpoint was trained with (same weights, another place). Recorded ids are not checked then.
        channels_last: NHWC memory format for the UNet and VAE (faster convolutions on GPUs).
        compile_unet: ``torch.compile`` the UNet (pays off for many tiles of one size).
    """
    from tadm.checkpoint_io import read_checkpoint

    source = str(ckpt)
    state, meta = read_checkpoint(ckpt)
    if not meta.get("config"):
        raise CheckpointError(
            f"checkpoint {source} has no stored run config; it cannot be rebuilt for inference"
        )
    module = build_module(meta["config"], source, backbone_pretrained)
    if backbone_pretrained is None:
        try:
            module._check_compatible(meta, source)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    else:
        log.warning(
            "backbone replaced by %s: the checkpoint's backbone id is not checked", backbone_pretrained
        )
    module.load_trained_state(state, source)
    dev = torch.device(device)
    module.to(dev).eval()
    unet = getattr(module.backbone, "unet", None)
    if channels_last:
        for part in (unet, getattr(module.backbone, "vae", None)):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    if compile_unet and unet is not None:
        module.backbone.unet = torch.compile(unet)
    model_id = str(meta.get("model_id") or tensor_hash(state))
    return Codec(module, tiling or Tiling(), precision, model_id=model_id, source=source)


@contextlib.contextmanager
def timed_cuda(device: torch.device) -> Iterator[None]:
    """Synchronise CUDA around a timed region so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
