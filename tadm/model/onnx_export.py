"""The downscale path of a trained model as one ONNX graph: an 8-bit HR image in, its 8-bit LR image out.

A sender (a phone, a server without PyTorch) makes LR files with onnxruntime alone; the receiver
upscales them with ``tadm upscale`` (the upscale side, with its diffusion model, stays in PyTorch).
The graph is exactly what ``tadm downscale`` computes on a whole image:

    (H, W, 3) uint8 RGB  -> [-1, 1] as ``load_image`` scales it -> reflect-pad to a multiple of
    ``pad_multiple`` (inside the graph, any H and W) -> the backbone's encoder (VAE encoder for SD,
    space-to-depth for the embedded backbone; skipped for pixel rescalers) -> ``rescaler.downscale``
    -> 8-bit rounding -> (ceil(H/m)*m/s, ceil(W/m)*m/s, 3) uint8 RGB, the pixels an LR PNG stores.

Why uint8 HWC in and out: it is what every image decoder gives and every encoder takes, so a deployer
writes no tensor layout or scaling code (and cannot get the [-1, 1] convention wrong), the rounding to
the stored 8-bit values happens inside the graph (no float output to round differently), and the input
is the exact 8-bit data ``tadm`` reads from an 8-bit file. One image per call (LR files are per image).

The graph works on the whole image: ``tadm downscale`` tiles large images (VAE tiles of 768 px with
image-wide GroupNorm statistics, rescaler tiles of 128 LR px), so for images above those sizes the
graph equals ``tadm downscale --vae-tile 0 --lr-tile 0``, and its memory grows with the image.
The ONNX file's metadata holds the PNG text chunks (``tadm:scale``, ``tadm:rescaler_id`` ...) an LR file
needs, less ``tadm:hr_size``, which the caller adds (docs/deploy.md).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tadm.contracts import DiffusionBackbone, Rescaler
from tadm.errors import CheckpointError
from tadm.inference.codec import Codec
from tadm.inference.lr_files import FORMAT_VERSION
from tadm.inference.pipeline import pad_multiple
from tadm.ops.files import atomic_write

#: opset 18: the first whose Resize has ``antialias`` (the antialiased bicubic of ``bicubic_skip`` DFRMs
#: and of the bicubic rescaler)
ONNX_OPSET = 18
#: the packages ``--format onnx`` needs (the ``onnx`` extra): the exporter, its ONNX builder, the check
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "hr", "lr"
#: the example the graph is traced with and checked on after export (any size works afterwards)
EXAMPLE_SIZE = (88, 72)
#: what the export check tolerates between onnxruntime and PyTorch on its example: both run the same
#: float32 ops, but kernels may sum in another order, which can flip a value sitting at k + 0.5 (an
#: 8-bit level apart). More than this is a wrong graph, not rounding.
MAX_LEVEL_DIFF = 1
MAX_DIFF_FRACTION = 1e-3


def reflect_index(n: Any, total: Any) -> Tensor:
    """Indices of ``total`` samples of a length-``n`` axis padded at its end by repeated reflection.

    The same samples as :func:`tadm.ops.images.pad_to_multiple` (reflect, again and again for pads
    longer than the axis, replicate for a 1-pixel axis), written as one gather so the exporter sees a
    graph for any ``n``: reflection is periodic with period 2(n - 1). ``last`` (n - 1) is a tensor,
    not a size: torch.export assumes sizes are at least 2 and would drop the ``clamp_min(1)`` that keeps
    a 1-pixel axis from a remainder by zero.
    """
    last = torch.arange(n)[-1:]
    period = (2 * last).clamp_min(1)
    i = torch.remainder(torch.arange(total), period)
    return torch.where(i > last, period - i, i)


class DownscaleGraph(nn.Module):
    """HR (H, W, 3) uint8 -> LR (h, w, 3) uint8, the whole-image ``tadm downscale`` (module docstring)."""

    def __init__(self, backbone: DiffusionBackbone, rescaler: Rescaler) -> None:
        super().__init__()
        self.backbone = backbone
        self.rescaler = rescaler
        self.multiple = pad_multiple(backbone, rescaler)

    def forward(self, hr: Tensor) -> Tensor:
        # [0, 255] -> [-1, 1] with load_image's float32 ops (x / 255 * 2 - 1), so values match bit for bit
        x = hr.permute(2, 0, 1).unsqueeze(0).float() / 255.0 * 2.0 - 1.0
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        # (h + m - 1) // m * m rather than h + (-h) % m: the same number, and a symbolic size the
        # exporter simplifies through the network in half the time
        x = x.index_select(2, reflect_index(h, (h + m - 1) // m * m))
        x = x.index_select(3, reflect_index(w, (w + m - 1) // m * m))
        z = self.backbone.encode(x) if self.rescaler.space == "latent" else None
        y = self.rescaler.downscale(x, z)  # eval mode: already on the 8-bit grid
        v = ((y + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)  # lr_files.to_uint8's rounding
        return v[0].permute(1, 2, 0)


@dataclass(frozen=True)
class Agreement:
    """How two LR images (uint8) differ: values compared, values that differ, the largest difference."""

    values: int
    differing: int
    max_abs: int

    @property
    def fraction(self) -> float:
        return self.differing / max(self.values, 1)

    def within(self, max_level: int = MAX_LEVEL_DIFF, max_fraction: float = MAX_DIFF_FRACTION) -> bool:
        return self.max_abs <= max_level and self.fraction <= max_fraction

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(
            self.values + other.values, self.differing + other.differing, max(self.max_abs, other.max_abs)
        )


def agreement(a: np.ndarray, b: np.ndarray) -> Agreement:
    """Compare two uint8 LR images of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"LR images differ in shape: {a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return Agreement(int(d.size), int(np.count_nonzero(d)), int(d.max()) if d.size else 0)


def example_image(size: tuple[int, int] = EXAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 test card: gradients (smooth areas) plus seeded noise (detail)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / max(w - 1, 1), yy * 255.0 / max(h - 1, 1), (xx + yy) % 64 * 4.0], -1)
    noise = np.random.default_rng(seed).normal(0.0, 24.0, (h, w, 3))
    return np.clip(base + noise, 0, 255).round().astype(np.uint8)


def missing_packages() -> list[str]:
    """The packages of the ``onnx`` extra that are not installed."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def check_target(dst: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any slow loading, an output that is not ``.onnx``, one that exists (without
    ``overwrite``) and a missing ``onnx`` extra."""
    dst_p = Path(dst).expanduser()
    if dst_p.suffix != ".onnx":
        raise CheckpointError(f"ONNX export target '{dst_p}' must end in .onnx")
    if dst_p.exists() and not overwrite:
        raise FileExistsError(
            f"export target '{dst_p}' exists; pass overwrite=True (--overwrite) to replace it"
        )
    missing = missing_packages()
    if missing:
        raise CheckpointError(f"exporting to ONNX needs {', '.join(missing)}: pip install 'tadm[onnx]'")
    return dst_p


def _check_exportable(codec: Codec) -> None:
    m = codec.module
    if missing_packages():
        raise CheckpointError(
            f"exporting to ONNX needs {', '.join(missing_packages())}: pip install 'tadm[onnx]'"
        )
    if m.rescaler.space == "latent" and m.backbone.sample_latent:
        raise CheckpointError(
            f"{codec.source}: backbone {m.backbone.backbone_id} draws a random sample of its latent, so its "
            "LR images are not reproducible and have no ONNX graph; export a model whose backbone encodes "
            "the posterior mean"
        )


def _describe(codec: Codec) -> str:
    m = codec.module
    rescaler = type(m.rescaler)
    return (
        f"rescaler {rescaler.__module__}.{rescaler.__qualname__} on backbone {m.backbone.backbone_id} "
        f"(checkpoint {codec.source or '<in memory>'})"
    )


def trace_onnx(codec: Codec) -> Any:
    """The ``onnx.ModelProto`` of ``codec``'s downscale path (torch.export + the dynamo exporter), with
    dynamic height and width; an exporter failure is a :class:`CheckpointError` naming the rescaler."""
    _check_exportable(codec)
    graph = DownscaleGraph(codec.module.backbone, codec.module.rescaler).eval()
    example = torch.from_numpy(example_image())
    try:
        # the exporter prints its progress and warns about what it decomposes: keep commands quiet
        with torch.no_grad(), redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: "height", 1: "width"}},  # named axes in the file
                opset_version=ONNX_OPSET,
                external_data=False,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; all mean "this model has no graph"
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(
            f"cannot export the downscaler to ONNX: {_describe(codec)} uses something torch.onnx cannot "
            f"translate ({type(err).__name__}: {first[:300]}); its LR files need `tadm downscale`"
        ) from err
    if program is None:  # only the legacy exporter returns None
        raise CheckpointError(f"torch.onnx.export returned no program for {_describe(codec)}")
    return program.model_proto


def lr_metadata(codec: Codec) -> dict[str, str]:
    """The ONNX file's metadata: an LR PNG's ``tadm:`` text chunks (less ``tadm:hr_size``) and facts
    about the graph."""
    m = codec.module
    return {
        "tadm:version": FORMAT_VERSION,
        "tadm:scale": str(codec.scale),
        "tadm:rescaler_id": codec.rescaler_id,
        "tadm:model_id": codec.model_id,
        "pad_multiple": str(codec.pad_multiple),
        "backbone_id": m.backbone.backbone_id,
        "rescaler": f"{type(m.rescaler).__module__}.{type(m.rescaler).__qualname__}",
        "input": f"{INPUT_NAME}: (H, W, 3) uint8 RGB, any H and W",
        "output": f"{OUTPUT_NAME}: (ceil(H/m)*m/scale, ceil(W/m)*m/scale, 3) uint8 RGB, m = pad_multiple",
    }


def run_onnx(model: Any, image: np.ndarray) -> np.ndarray:
    """Run an ONNX downscaler (a ``ModelProto``, its bytes or a file path) on one (H, W, 3) uint8 image
    with onnxruntime on one CPU thread."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check on a small card: one core is enough, and leaves the rest
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: np.ascontiguousarray(image, dtype=np.uint8)})[0]


def torch_lr(codec: Codec, image: np.ndarray) -> np.ndarray:
    """What the graph computes, in PyTorch (whole image, no tiling), as (h, w, 3) uint8."""
    graph = DownscaleGraph(codec.module.backbone, codec.module.rescaler).eval()
    with torch.no_grad():
        return graph(torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8))).numpy()


def export_onnx(codec: Codec, dst: str | Path, overwrite: bool = False) -> Path:
    """Write ``codec``'s downscale path to ``dst`` (``.onnx``), after checking that onnxruntime gives
    the LR image PyTorch gives on a test card (within rounding flips, :data:`MAX_LEVEL_DIFF`)."""
    dst_p = check_target(dst, overwrite)
    model = trace_onnx(codec)
    del model.metadata_props[:]
    for key, value in lr_metadata(codec).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "tadm downscaler: HR (H, W, 3) uint8 RGB -> 8-bit LR (h, w, 3) uint8 RGB"
    card = example_image((EXAMPLE_SIZE[0] + 13, EXAMPLE_SIZE[1] - 9), seed=1)  # not the traced size
    check = agreement(run_onnx(model, card), torch_lr(codec, card))
    if not check.within():
        raise CheckpointError(
            f"the ONNX graph of {_describe(codec)} disagrees with PyTorch on a test card: {check.differing} "
            f"of {check.values} LR values differ, by up to {check.max_abs} levels; not written"
        )
    import onnx

    return atomic_write(dst_p, lambda tmp: onnx.save_model(model, str(tmp)))
