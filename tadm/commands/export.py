"""``tadm export CKPT --output FILE.safetensors``: a small inference checkpoint (see
:func:`tadm.model.checkpoints.export_checkpoint`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tadm.commands.common import EXIT_OK, command, writable_file
from tadm.model.checkpoints import EXPORT_DTYPES, export_checkpoint, exported_weights


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tadm export",
        description="Write a small inference checkpoint: the trained tensors only (no optimiser state), "
        "in bf16/fp16 except the rescaler (fp32, so LR images stay bit-exact), with the run config and "
        "backbone id as metadata. `tadm upscale/downscale/evaluate --ckpt` and `model.init_from` read it.",
        epilog="example: tadm export runs/enhancer_x16/checkpoints/last.ckpt --output tadm_x16.safetensors",
    )
    ap.add_argument("ckpt", help="a tadm Lightning checkpoint (.ckpt) or an exported .safetensors")
    ap.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    ap.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        default="bf16",
        help="dtype of non-rescaler tensors (default bf16)",
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
    out = export_checkpoint(
        args.ckpt, args.output, dtype=args.dtype, overwrite=args.overwrite, weights=args.weights
    )
    mb_in, mb_out = Path(args.ckpt).stat().st_size / 1e6, out.stat().st_size / 1e6
    print(
        f"{args.ckpt}: {mb_in:.2f} MB -> {out}: {mb_out:.2f} MB "
        f"({args.dtype}, rescaler fp32, {exported_weights(out)} weights; {100 * mb_out / mb_in:.1f}% of the input)"
    )
    return EXIT_OK
