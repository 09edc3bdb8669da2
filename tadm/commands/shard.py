"""``tadm shard SRC OUT``: pack a folder of images into WebDataset tar shards (see
:func:`tadm.datamodules.shard_writer.pack_shards`), optionally with cached VAE latents."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from tadm.commands.common import EXIT_FAILED, EXIT_OK, command, progress_bar
from tadm.errors import ShardError


def parse_size(text: str | int) -> int:
    """Byte counts as ``1000000``, ``1e9``, ``500MB``, ``1G`` (powers of 1000) or ``2GiB`` (powers of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000000, 500MB, 1G, 2GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    value = float(number) * base ** " kmgt".index(unit or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tadm shard",
        description="Pack a folder of images into WebDataset tar shards (original bytes, one sample per "
        "image, OUT/index.json), optionally with cached VAE latents of fixed crops. Interrupted runs resume "
        "when rerun with the same arguments.",
        epilog="example: tadm shard /data/DIV2K_train_HR /data/shards/train --maxsize 1GB\n"
        "         tadm shard photos/ shards/ --latents configs/experiments/rescaler_x16.yaml --crop 512",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("src", help="folder of images (recursive)")
    ap.add_argument("out", help="output folder for the shards and index.json")
    ap.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    ap.add_argument(
        "--maxsize",
        type=parse_size,
        default=10**9,
        help="bytes per shard at most: 1e9, 500MB, 2GiB (default 1GB)",
    )
    ap.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar ... (default shard)")
    ap.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="unreadable image: stop naming it (default), or skip it (listed in index.json)",
    )
    ap.add_argument(
        "--check",
        choices=("header", "decode"),
        default="header",
        help="how each image is checked: its header (fast, default) or a full decode",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's shards in OUT")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    lat = ap.add_argument_group("cached latents")
    lat.add_argument(
        "--latents",
        nargs="+",
        metavar="CONFIG",
        help="tadm YAML config(s) (composed left to right) whose model.backbone encodes fixed crops",
    )
    lat.add_argument(
        "--backbone-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a backbone init arg, e.g. pretrained=/models/sd21-base (repeatable)",
    )
    lat.add_argument("--crop", type=int, default=512, help="crop side; must equal the training crop_size")
    lat.add_argument("--crops-per-image", type=int, default=4, help="fixed crops per image (default 4)")
    lat.add_argument(
        "--no-flip-latents",
        dest="flips",
        action="store_false",
        help="do not store latents of flipped crops (training then runs without flips)",
    )
    lat.add_argument("--seed", type=int, default=0, help="seed of the crop positions (default 0)")
    lat.add_argument(
        "--device", default="auto", help="encode on cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    lat.add_argument("--encode-batch", type=int, default=8, help="crops per encoder forward pass (default 8)")
    return ap


@command("tadm shard")
def shard_command(argv: Sequence[str]) -> int:
    """``tadm shard`` entry point: 0 all packed, 1 some images skipped (``--on-bad-image skip``), 2 unusable."""
    args = _parser().parse_args(list(argv))
    from tadm.datamodules.shard_writer import LatentOptions, pack_shards

    latents = None
    if args.latents:
        import torch

        from tadm.config.build import build_backbone

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        backbone = build_backbone(args.latents, args.backbone_arg)
        backbone.load_for_stage("rescaler")
        factor = int(backbone.downsample_factor)
        if args.crop % factor:
            raise ShardError(f"--crop {args.crop} is not a multiple of the backbone's downsampling {factor}")
        backbone.to(device).eval()
        if backbone.sample_latent:
            warnings.warn(
                "the backbone samples its latents: the cache holds one sample per crop", stacklevel=1
            )
        latents = LatentOptions(
            backbone,
            crop=args.crop,
            crops_per_image=args.crops_per_image,
            flips=args.flips,
            seed=args.seed,
            device=device,
            batch_size=args.encode_batch,
            config=[str(c) for c in args.latents] + [f"--backbone-arg {a}" for a in args.backbone_arg],
        )
    elif args.backbone_arg:
        raise ShardError("--backbone-arg needs --latents")

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    with progress_bar(None, f"tadm shard -> {args.out}", not args.quiet) as advance:
        done = 0

        def progress(now: int, total: int) -> None:
            nonlocal done
            advance(now - done, total)
            done = now

        index = pack_shards(
            args.src,
            args.out,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            prefix=args.prefix,
            on_bad_image=args.on_bad_image,
            check=args.check,
            latents=latents,
            overwrite=args.overwrite,
            say=say,
            progress=progress,
        )
    return EXIT_FAILED if index.get("skipped") else EXIT_OK
