"""``tadm embed-prompt --backbone CONFIG --output FILE.safetensors``: write the empty-prompt embedding of a
DiT backbone once, so training and inference nodes read it (``prompt_embedding: FILE``) and never load the
text encoders (T5-XXL: 4.7 B parameters, 19 GB in fp32)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tadm.commands.common import EXIT_OK, command, writable_file
from tadm.errors import InputError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tadm embed-prompt",
        description="Embed the empty prompt with a backbone's text encoders (CLIP-L, CLIP-G / T5-XXL) and write "
        "it as a small safetensors file (embeddings + metadata naming the model). Give it to the backbone as "
        "`prompt_embedding: FILE`: no text encoder is loaded then. Only the text encoders are loaded here.",
        epilog="example: tadm embed-prompt --backbone configs/backbone/flux1-dev.yaml --output flux-dev-empty.safetensors\n"
        "         (then --model.backbone.init_args.prompt_embedding flux-dev-empty.safetensors)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--backbone",
        nargs="+",
        required=True,
        metavar="CONFIG",
        help="tadm YAML config(s) (composed left to right) whose model.backbone is an SD 3 / FLUX backbone",
    )
    ap.add_argument(
        "--backbone-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a backbone init arg, e.g. pretrained=/models/FLUX.1-dev (repeatable)",
    )
    ap.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    ap.add_argument(
        "--device", default="cpu", help="run the text encoders on cpu, cuda, cuda:1 ... (default cpu)"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return ap


@command("tadm embed-prompt")
def embed_prompt_command(argv: Sequence[str]) -> int:
    """``tadm embed-prompt`` entry point: 0 written, 2 unusable input or output."""
    args = _parser().parse_args(list(argv))
    out = writable_file(args.output)
    if out.exists() and not args.overwrite:
        raise InputError(f"--output '{out}' exists; pass --overwrite to replace it")
    from tadm.config.build import build_backbone

    backbone = build_backbone(args.backbone, args.backbone_arg)
    backbone.to(args.device)
    try:
        path = backbone.save_prompt_embedding(out)
    except NotImplementedError as err:
        raise InputError(str(err)) from err
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = ", ".join(f"{k} {tuple(f.get_slice(k).get_shape())}" for k in sorted(f.keys()))  # noqa: SIM118
    print(f"{path}: {Path(path).stat().st_size / 1e6:.2f} MB ({shapes}) from {backbone.backbone_id}")
    return EXIT_OK
