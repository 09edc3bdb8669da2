"""``tadm downscale`` and ``tadm upscale``: a trained model as an HR -> 8-bit LR -> HR codec.

    tadm downscale --ckpt C photos/ more/*.jpg --output lr/
    tadm upscale   --ckpt C lr/ --output restored/

Inputs are files, folders (recursive) and glob patterns; outputs keep each file's path relative to
the folder it was found in. Every output is written atomically; existing outputs are skipped unless
``--overwrite``, so an interrupted run is finished by running it again. A bad file is reported and
the rest are processed; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from datamodules.image_io import IMAGE_EXTENSIONS, ImageReadError

if TYPE_CHECKING:
    from torch import Tensor

    from tadm.codec import Codec
    from tadm.lr_files import LRMeta


class InputError(ValueError):
    """A command-line input that names nothing usable."""


@dataclass
class InputFile:
    path: Path
    #: output path relative to the output folder, without suffix
    rel: Path


def collect_inputs(inputs: Sequence[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[InputFile]:
    """Files, folders (recursive) and globs -> input files with their output names.

    Files in folders whose extension is not an image extension are skipped with one warning per
    folder; a path or pattern that matches nothing is an error; two inputs mapping to the same
    output name are an error (before anything is written).
    """
    found: list[InputFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in files if f.suffix.lower() in extensions]
            others = [f for f in files if f.suffix.lower() not in extensions and not f.name.startswith(".")]
            if others:
                warnings.warn(
                    f"{p}: skipping {len(others)} file(s) that are not images by extension "
                    f"(e.g. {others[0].name}); accepted: {', '.join(extensions)}",
                    stacklevel=2,
                )
            if not images:
                raise InputError(f"input folder '{p}' holds no images")
            found += [InputFile(f, f.relative_to(p).parent / f.stem) for f in images]
        elif p.is_file():
            found.append(InputFile(p, Path(p.stem)))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"pattern '{item}' matches no files")
            found += [InputFile(m, Path(m.stem)) for m in matches]
        else:
            raise InputError(f"input '{item}' does not exist")
    seen: dict[Path, Path] = {}
    for f in found:
        if f.rel in seen and seen[f.rel] != f.path:
            raise InputError(
                f"inputs '{seen[f.rel]}' and '{f.path}' would both write '{f.rel}.png'; "
                "pass their folders instead of the files, or run them separately"
            )
        seen[f.rel] = f.path
    unique = {f.path.resolve(): f for f in found}
    return list(unique.values())


@dataclass
class RunReport:
    """Counts and failures of one command run; exit status 1 when anything failed."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, verb: str) -> str:
        lines = [
            f"{verb} {self.done} file(s), skipped {self.skipped} existing, {len(self.failed)} failed "
            f"in {self.seconds:.1f} s"
        ]
        lines += [f"  FAILED {path}: {why}" for path, why in self.failed]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_files(
    files: Sequence[InputFile],
    output: Path,
    process: Callable[[InputFile, Path], None],
    overwrite: bool,
    verb: str,
    progress: bool = True,
) -> RunReport:
    """Apply ``process(input, destination)`` to every file, skipping existing outputs, catching bad files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    report = RunReport()
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(verb, total=len(files))
        for f in files:
            dest = output / f.rel.parent / f"{f.rel.name}.png"  # not with_suffix: "a.v2.jpg" -> "a.v2.png"
            if dest.exists() and not overwrite:
                report.skipped += 1
            else:
                try:
                    process(f, dest)
                    report.done += 1
                except (ImageReadError, LRFileError, ValueError, RuntimeError) as err:
                    # one bad file must not stop a folder of many: report it, go on, exit 1 at the end
                    report.failed.append((f.path, str(err) or type(err).__name__))
                    print(f"error: {err}", file=sys.stderr)
            bar.advance(task)
    report.seconds = time.perf_counter() - start
    return report


class LRFileError(ValueError):
    """An LR file this checkpoint cannot upscale (other model or scale, bad size)."""


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """Checkpoint, device, precision and tiling options shared by downscale / upscale / test."""
    ap.add_argument(
        "--ckpt", required=True, help="checkpoint (.ckpt from training, or .safetensors from tadm export)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast for UNet/VAE (default fp32)",
    )
    ap.add_argument("--backbone", default=None, help="load the frozen backbone from this folder instead")
    ap.add_argument(
        "--latent-tile", type=int, default=96, help="enhancer tile in latent pixels (0: whole image)"
    )
    ap.add_argument("--latent-overlap", type=int, default=32, help="enhancer tile overlap in latent pixels")
    ap.add_argument("--tile-batch", type=int, default=1, help="enhancer tiles per UNet call (raise on GPUs)")
    ap.add_argument("--vae-tile", type=int, default=768, help="VAE tile in image pixels (0: whole image)")
    ap.add_argument("--vae-overlap", type=int, default=128, help="VAE tile overlap in image pixels")
    ap.add_argument("--lr-tile", type=int, default=128, help="rescaler tile in LR pixels (0: whole image)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPUs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")


def load_from_args(args: argparse.Namespace) -> Codec:
    """The codec the command-line options describe."""
    from tadm.codec import load_codec
    from tadm.tiling import Tiling

    tiling = Tiling(
        latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap if args.latent_tile > 0 else 0,
        tile_batch=args.tile_batch,
        vae_tile=args.vae_tile,
        vae_overlap=args.vae_overlap if args.vae_tile > 0 else 0,
        lr_tile=args.lr_tile,
    )
    return load_codec(
        args.ckpt,
        device=args.device,
        precision=args.precision,
        tiling=tiling,
        backbone_pretrained=args.backbone,
        channels_last=args.channels_last,
        compile_unet=args.compile,
    )


def _run(argv: Sequence[str], prog: str, doc: str, body: Callable[[argparse.Namespace], int]) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    add_model_arguments(ap)
    ap.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    if prog.endswith("upscale"):
        ap.add_argument(
            "--save-timesteps", action="store_true", help="also write NAME.timesteps.png heat maps"
        )
    args = ap.parse_args(list(argv))
    try:
        return body(args)
    except (InputError, ValueError, FileNotFoundError, KeyError) as err:  # CheckpointError is a ValueError
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


def downscale_command(argv: Sequence[str]) -> int:
    """HR images -> 8-bit LR PNGs (with HR size, scale and checkpoint ids as PNG metadata)."""

    def body(args: argparse.Namespace) -> int:
        from datamodules.image_io import load_image
        from tadm.lr_files import LRMeta, write_lr

        files = collect_inputs(args.inputs)
        codec = load_from_args(args)

        def process(f: InputFile, dest: Path) -> None:
            x = load_image(f.path)[None]
            y, (h, w) = codec.downscale(x)
            meta = LRMeta(h, w, codec.scale, codec.rescaler_id, codec.model_id)
            write_lr(dest, y, meta)

        report = run_files(files, args.output, process, args.overwrite, "downscale", not args.no_progress)
        print(report.summary("downscaled"))
        return report.exit_code

    return _run(argv, "tadm downscale", downscale_command.__doc__ or "", body)


def upscale_command(argv: Sequence[str]) -> int:
    """LR PNGs -> HR images at their original size (read from the PNG metadata)."""

    def body(args: argparse.Namespace) -> int:

        import torch

        from tadm.lr_files import read_lr, write_png
        from tadm.tiling import heat_map

        files = collect_inputs(args.inputs, extensions=IMAGE_EXTENSIONS)
        codec = load_from_args(args)

        def process(f: InputFile, dest: Path) -> None:
            y, meta = read_lr(f.path)
            size = lr_target_size(f.path, y, meta, codec)
            out = codec.upscale(y, size)
            if args.save_timesteps and out.timesteps is not None:
                aligner = codec.module.aligner
                heat = heat_map(
                    out.timesteps, getattr(aligner, "t_min", None), getattr(aligner, "t_max", None)
                )
                f = codec.module.backbone.downsample_factor
                heat = torch.nn.functional.interpolate(heat, scale_factor=f, mode="nearest")
                write_png(dest.with_suffix(".timesteps.png"), heat[..., : size[0], : size[1]] * 2 - 1)
            write_png(dest, out.image)

        report = run_files(files, args.output, process, args.overwrite, "upscale", not args.no_progress)
        print(report.summary("upscaled"))
        return report.exit_code

    return _run(argv, "tadm upscale", upscale_command.__doc__ or "", body)


def lr_target_size(path: Path, y: Tensor, meta: LRMeta | None, codec: Codec) -> tuple[int, int]:
    """The HR size to restore, after checking the LR file fits this checkpoint."""
    scale, h, w = codec.scale, y.shape[-2], y.shape[-1]
    if meta is None:
        warnings.warn(
            f"{path}: no tadm metadata; assuming it was made at this checkpoint's scale x{scale} "
            f"(output {w * scale}x{h * scale})",
            stacklevel=2,
        )
        return h * scale, w * scale
    if meta.scale != scale:
        raise LRFileError(f"{path}: LR file was made at scale x{meta.scale}, this checkpoint is x{scale}")
    if meta.rescaler_id and meta.rescaler_id != codec.rescaler_id:
        raise LRFileError(
            f"{path}: LR file was made by a different model (rescaler id {meta.rescaler_id}, model id "
            f"{meta.model_id}); this checkpoint's rescaler id is {codec.rescaler_id}: upscale it with the "
            "checkpoint that downscaled it"
        )
    m = codec.pad_multiple
    ph, pw = -(-meta.hr_height // m) * m, -(-meta.hr_width // m) * m
    if (h * scale, w * scale) != (ph, pw):
        raise LRFileError(
            f"{path}: LR image is {w}x{h} but its metadata says HR {meta.hr_width}x{meta.hr_height} at "
            f"x{scale} (expected LR {pw // scale}x{ph // scale}); was it resized?"
        )
    return meta.hr_height, meta.hr_width
