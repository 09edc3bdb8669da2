"""A trained model as an image codec: HR -> 8-bit LR -> HR, tiled, on any device and precision.

:class:`Codec` wraps a model that is already built and loaded (``tadm.model.loading.load_codec`` builds
one from a checkpoint). Two ids identify what a checkpoint can decode:

- ``rescaler_id``: hash of the rescaler's weights, class and scale. An LR image can be upscaled by
  any checkpoint with the same rescaler (a stage-2 model keeps its stage-1 DFRM frozen, so LR files
  written by the stage-1 checkpoint stay valid). LR files carry it; a mismatch is an error.
- ``model_id``: hash of every trained tensor as stored (provenance, written into LR files too).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from tadm.contracts import DiffusionBackbone, Rescaler, TimestepAligner
from tadm.errors import CheckpointError, LRFileError
from tadm.inference import pipeline
from tadm.inference.lr_files import LRMeta
from tadm.inference.tiling import Tiling
from tadm.ops.color_fix import ColorFix, check_color_fix

Precision = Literal["fp32", "bf16", "fp16"]
#: an LR file without tadm metadata whose restored longer side would pass this is refused: it is far
#: more likely a full-size photo given to ``tadm upscale`` by mistake (16K = 16384 px, DIV8K's size x2)
DEFAULT_MAX_HR_SIDE = 16384
#: peak memory of one ``tadm upscale`` per output pixel, beyond the model's own: the slope of its peak RSS
#: between 2048x2048 and 4096x4096 outputs of the quickstart model (``benchmarks/upscale_memory.py``:
#: 33.4 bytes; its 192-channel lossless latent is the heaviest per pixel; SD 2.1's tiled path took
#: 15 bytes). Tiles keep the model's working memory constant; the whole-image buffers (LR, latent,
#: blend accumulator and weights, output, its 8-bit copy, the PNG encoder) grow with the output.
BYTES_PER_HR_PIXEL = 34
#: what those whole-image buffers may take by default (a laptop's share; ``--max-hr-megapixels`` raises it)
DEFAULT_HR_MEMORY_BYTES = 4 * 2**30
#: the default output size limit of ``tadm upscale``: 126 MP (e.g. 11200x11200, or DIV8K's largest x2)
DEFAULT_MAX_HR_MEGAPIXELS = round(DEFAULT_HR_MEMORY_BYTES / BYTES_PER_HR_PIXEL / 1e6)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Model(Protocol):
    """What the codec needs of a model (``TADMModule`` is one): its parts and its one-step enhancer."""

    backbone: DiffusionBackbone
    rescaler: Rescaler
    aligner: TimestepAligner | None
    scale: int

    @property
    def enhance_fn(self) -> pipeline.Enhance | None: ...

    def eval(self) -> Any: ...

    def parameters(self) -> Any: ...

    def buffers(self) -> Any: ...


def tensor_hash(state: dict[str, Tensor], extra: str = "") -> str:
    """Short stable hash of named tensors (names, dtypes, shapes and bytes), 16 hex digits."""
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rescaler_identity(rescaler: nn.Module) -> str:
    """The id LR files are checked against: the rescaler's weights, class and scale."""
    state = {k: v.float() for k, v in rescaler.state_dict().items() if v.is_floating_point()}
    cls = type(rescaler)
    return tensor_hash(state, f"{cls.__module__}.{cls.__qualname__}|x{rescaler.scale}")


@dataclass
class Codec:
    """A loaded model for inference: ``downscale`` HR -> 8-bit LR, ``upscale`` LR -> HR.

    ``precision`` runs the UNet, Refiner and VAE decoder under autocast (bf16 / fp16); the rescaler
    always runs in fp32 so the LR image is the same 8-bit image on every device and precision. VAEs
    flagged ``force_upcast`` (SDXL's) stay fp32 inside autocast (the backbone sees to that).
    ``color_fix`` (``none``, ``wavelet``, ``adain``: :mod:`tadm.ops.color_fix`) corrects every
    reconstruction towards the bicubic upscale of its LR image, in fp32, once on the whole image.
    """

    module: Model
    tiling: Tiling = field(default_factory=Tiling)
    precision: Precision = "fp32"
    model_id: str = ""
    rescaler_id: str = ""
    source: str = ""
    color_fix: ColorFix = "none"

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {self.precision!r}")
        check_color_fix(self.color_fix)
        self.module.eval()
        if not self.rescaler_id:
            self.rescaler_id = rescaler_identity(self.module.rescaler)

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
        """HR (B,3,H,W) in [-1,1] -> (8-bit LR images in [-1,1] of the padded HR images, (H, W)); a batch is
        images of one size (``--batch-size``), each computed as alone up to kernel rounding."""
        m = self.module
        y, size, _ = pipeline.downscale(m.backbone, m.rescaler, x.to(self.device).float(), self.tiling)
        return y, size

    @torch.no_grad()
    def upscale(self, y: Tensor, size: tuple[int, int]) -> pipeline.Upscaled:
        """LR (B,3,h,w) in [-1,1] -> HR images cropped to ``size`` (and the timestep maps used); a batch is LR
        images that restore to one size."""
        m = self.module
        if m.aligner is not None and m.aligner.needs_true_latent:
            raise CheckpointError(
                f"checkpoint {self.source} uses the analysis aligner {type(m.aligner).__name__}, which needs "
                "the HR image: it cannot upscale an LR file alone (use `tadm evaluate` to evaluate it)"
            )
        return pipeline.upscale(
            m.backbone,
            m.rescaler,
            y.to(self.device),
            size,
            m.enhance_fn,
            self.tiling,
            precision=self._autocast,
            color_fix=self.color_fix,
        )

    @torch.no_grad()
    def round_trip(self, x: Tensor) -> pipeline.RoundTrip:
        """Downscale then upscale (analysis aligners get the HR latent)."""
        m = self.module
        return pipeline.round_trip(
            m.backbone,
            m.rescaler,
            x.to(self.device),
            m.enhance_fn,
            self.tiling,
            precision=self._autocast,
            color_fix=self.color_fix,
        )

    def target_size(
        self,
        y: Tensor,
        meta: LRMeta | None,
        name: str,
        max_hr_side: int = DEFAULT_MAX_HR_SIDE,
        max_hr_megapixels: float = DEFAULT_MAX_HR_MEGAPIXELS,
    ) -> tuple[int, int]:
        """The HR size to restore an LR image ``y`` to, after checking the file ``name`` fits this model.

        Without tadm metadata the checkpoint's scale is assumed (with a warning), unless the result would
        be longer than ``max_hr_side``: such an input is refused as a full-size image. Another scale or
        rescaler, or an LR size that disagrees with the recorded HR size, is an :class:`LRFileError`; so
        is an output over ``max_hr_megapixels`` (the memory it would take, :data:`BYTES_PER_HR_PIXEL`).
        """
        size = self._checked_size(y, meta, name, max_hr_side)
        _check_memory(name, size, (y.shape[-2] * self.scale, y.shape[-1] * self.scale), max_hr_megapixels)
        return size

    def _checked_size(self, y: Tensor, meta: LRMeta | None, name: str, max_hr_side: int) -> tuple[int, int]:
        scale, h, w = self.scale, y.shape[-2], y.shape[-1]
        if meta is None and max(h, w) * scale > max_hr_side:
            raise LRFileError(
                f"{name}: a {w}x{h} image without tadm metadata would become {w * scale}x{h * scale} px at "
                f"x{scale}: this looks like a full-size image, not an LR file (`tadm downscale` writes LR "
                f"files; --max-hr-side {max(h, w) * scale} upscales it anyway)"
            )
        if meta is None:
            warnings.warn(
                f"{name}: no tadm metadata; assuming it was made at this checkpoint's scale x{scale} "
                f"(output {w * scale}x{h * scale})",
                stacklevel=2,
            )
            return h * scale, w * scale
        if meta.scale != scale:
            raise LRFileError(f"{name}: LR file was made at scale x{meta.scale}, this checkpoint is x{scale}")
        if meta.rescaler_id and meta.rescaler_id != self.rescaler_id:
            raise LRFileError(
                f"{name}: LR file was made by a different model (rescaler id {meta.rescaler_id}, model id "
                f"{meta.model_id}); this checkpoint's rescaler id is {self.rescaler_id}: upscale it with the "
                "checkpoint that downscaled it"
            )
        m = self.pad_multiple
        ph, pw = -(-meta.hr_height // m) * m, -(-meta.hr_width // m) * m
        if (h * scale, w * scale) != (ph, pw):
            raise LRFileError(
                f"{name}: LR image is {w}x{h} but its metadata says HR {meta.hr_width}x{meta.hr_height} at "
                f"x{scale} (expected LR {pw // scale}x{ph // scale}); was it resized?"
            )
        return meta.hr_height, meta.hr_width


def _check_memory(
    name: str, size: tuple[int, int], processed: tuple[int, int], max_hr_megapixels: float
) -> None:
    """Refuse an upscale whose whole-image buffers (``processed``: the padded HR size) would pass the limit,
    saying what it would cost and which option raises the limit."""
    pixels = processed[0] * processed[1]
    if pixels <= max_hr_megapixels * 1e6:
        return
    mp = pixels / 1e6
    digits = 1 if mp >= 1 else 2
    needed = math.ceil(mp) if mp >= 1 else math.ceil(mp * 100) / 100
    raise LRFileError(
        f"{name}: restoring it to {size[1]}x{size[0]} px ({mp:.{digits}f} MP) would take about "
        f"{_bytes_text(pixels * BYTES_PER_HR_PIXEL)} of memory besides the model, over the limit of "
        f"{max_hr_megapixels:g} MP (about {_bytes_text(max_hr_megapixels * 1e6 * BYTES_PER_HR_PIXEL)}); "
        f"--max-hr-megapixels {needed} upscales it anyway"
    )


def _bytes_text(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
