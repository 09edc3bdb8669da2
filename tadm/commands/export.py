"""``tadm export CKPT --output FILE.safetensors``: a small inference checkpoint (see
:func:`tadm.model.checkpoints.export_checkpoint`); ``--format onnx --output FILE.onnx``: the downscale
path as an ONNX graph for onnxruntime (see :mod:`tadm.model.onnx_export`, docs/deploy.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tadm.commands.common import EXIT_OK, command, writable_file
from tadm.errors import InputError
from tadm.model.checkpoints import EXPORT_DTYPES, export_checkpoint, exported_weights


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tadm export",
        description="Write a small inference checkpoint: the trained tensors only (no optimiser state), "
        "in bf16/fp16 except the rescaler (fp32, so LR images stay bit-exact), with the run config and "
        "backbone id as metadata. `tadm upscale/downscale/evaluate --ckpt` and `model.init_from` read it. "
        "With --format onnx: the downscale path (HR image -> 8-bit LR image) as an ONNX graph instead.",
        epilog="examples: tadm export runs/enhancer_x16/checkpoints/last.ckpt --output tadm_x16.safetensors; "
        "tadm export tadm_x16.safetensors --format onnx --output downscaler.onnx (docs/deploy.md)",
    )
    ap.add_argument("ckpt", help="a tadm Lightning checkpoint (.ckpt) or an exported .safetensors")
    ap.add_argument(
        "--output", "-o", required=True, help="the .safetensors (or, with --format onnx, .onnx) file"
    )
    ap.add_argument(
        "--format",
        choices=("safetensors", "onnx"),
        default="safetensors",
        help="safetensors: the inference checkpoint (default); onnx: the downscaler only (HR uint8 image -> "
        "8-bit LR image, any size, whole image) for onnxruntime; the upscale side stays in PyTorch",
    )
    ap.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        default="bf16",
        help="dtype of non-rescaler tensors (default bf16; safetensors only: the ONNX graph is fp32)",
    )
    ap.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="write the EMA of the trained tensors or the raw ones (default: the EMA when the checkpoint "
        "has one, i.e. it was trained with model.ema_decay); the file's metadata records which",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return ap


@command("tadm export")
def export_command(argv: Sequence[str]) -> int:
    """``tadm export`` entry point: 0 written, 2 unusable input or output."""
    args = _parser().parse_args(list(argv))
    writable_file(args.output)
    if args.format == "onnx":
        return _export_onnx(args)
    if Path(args.output).suffix == ".onnx":
        raise InputError(
            f"--output '{args.output}' is an .onnx file: add --format onnx for the ONNX downscaler"
        )
    out = export_checkpoint(
        args.ckpt, args.output, dtype=args.dtype, overwrite=args.overwrite, weights=args.weights
    )
    mb_in, mb_out = Path(args.ckpt).stat().st_size / 1e6, out.stat().st_size / 1e6
    print(
        f"{args.ckpt}: {mb_in:.2f} MB -> {out}: {mb_out:.2f} MB "
        f"({args.dtype}, rescaler fp32, {exported_weights(out)} weights; {100 * mb_out / mb_in:.1f}% of the input)"
    )
    return EXIT_OK


def _export_onnx(args: argparse.Namespace) -> int:
    """The downscale path of ``args.ckpt`` as ``args.output`` (.onnx), checked against PyTorch."""
    from tadm.model.loading import load_codec
    from tadm.model.onnx_export import check_target, export_onnx

    check_target(args.output, args.overwrite)  # before the (slow) loading
    codec = load_codec(args.ckpt, weights=args.weights)
    out = export_onnx(codec, args.output, overwrite=args.overwrite)
    m = codec.pad_multiple
    print(
        f"{args.ckpt} -> {out}: {out.stat().st_size / 1e6:.2f} MB ONNX downscaler, x{codec.scale}: "
        f"hr (H, W, 3) uint8 -> lr (ceil(H/{m})*{m}/{codec.scale}, ceil(W/{m})*{m}/{codec.scale}, 3) uint8, "
        "whole image (docs/deploy.md)"
    )
    return EXIT_OK
