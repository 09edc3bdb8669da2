"""What every command shares: the exit-code convention, error reporting, the per-file loop with its
rich progress bar, and the checkpoint / device / tiling options of the inference commands.

Exit codes (README "Commands"): ``0`` everything was processed; ``1`` some inputs failed (each is
reported, the rest were processed); ``2`` the invocation is unusable (bad option, missing checkpoint or
input, unwritable output): nothing was processed. Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tadm.errors import InputError, TadmError

if TYPE_CHECKING:
    from tadm.inference.codec import Codec
    from tadm.inference.tiling import Tiling

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: 128 + SIGTERM, what a shell reports for a process a SIGTERM ended: the job was preempted, resume it
EXIT_TERMINATED = 143

#: what an unusable invocation raises: reported in one line, exit 2
USAGE_ERRORS: tuple[type[BaseException], ...] = (TadmError, OSError, ValueError, KeyError)

T = TypeVar("T")


def error_line(err: BaseException) -> str:
    """One line for an error (KeyError quotes its message; we do not)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    return str(msg) or type(err).__name__


def command(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command body: usage errors -> one line on stderr + exit 2, Ctrl-C -> one line + 130."""

    def deco(body: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return body(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except USAGE_ERRORS as err:
                print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
                return EXIT_USAGE

        return run

    return deco


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A rich progress bar (Lightning's RichProgressBar uses rich too); yields ``advance(n=1, total=None)``
    (``total`` sets or corrects the total when it becomes known)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not enabled, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        yield advance


@dataclass
class RunReport:
    """Counts and failures of one command run; exit status 1 when anything failed."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, verb: str) -> str:
        lines = [
            f"{verb} {self.done} file(s), skipped {self.skipped} existing, {len(self.failed)} failed "
            f"in {self.seconds:.1f} s"
        ]
        lines += [f"  FAILED {name}: {why}" for name, why in self.failed]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else EXIT_OK


#: what one bad input may raise without stopping the others (reported, exit 1 at the end)
ITEM_ERRORS: tuple[type[BaseException], ...] = (TadmError, ValueError, RuntimeError, OSError)


def for_each(
    items: Iterable[T],
    process: Callable[[T], bool | None],
    name: Callable[[T], str],
    description: str,
    total: int | None = None,
    progress: bool = True,
) -> RunReport:
    """The per-file loop of every command: ``process(item)`` each item under one progress bar.

    ``process`` returns False when it skipped the item (e.g. its output exists). An item that raises one
    of :data:`ITEM_ERRORS` is reported on stderr and in the report, and the loop goes on.
    """
    report = RunReport()
    start = time.perf_counter()
    with progress_bar(total, description, progress) as advance:
        for item in items:
            try:
                if process(item) is False:
                    report.skipped += 1
                else:
                    report.done += 1
            except ITEM_ERRORS as err:
                report.failed.append((name(item), error_line(err)))
                print(f"error: {error_line(err)}", file=sys.stderr)
            advance(1)
    report.seconds = time.perf_counter() - start
    return report


#: what one item of a batch came to: True done, False skipped, or the error that item alone raised
Outcome = bool | BaseException


def for_each_batch(
    batches: Iterable[Sequence[T]],
    process: Callable[[Sequence[T]], Sequence[Outcome]],
    name: Callable[[T], str],
    description: str,
    total: int | None = None,
    progress: bool = True,
) -> RunReport:
    """:func:`for_each` over batches: ``process(batch)`` returns one :data:`Outcome` per item, in order.

    An item's own error (unreadable, an output that cannot be written) is its outcome; an error that escapes
    ``process`` (the batched model call failed) is retried item by item (:func:`each_alone`), so one bad input
    in a batch is reported alone and the others are still processed. The bar advances per item.
    """
    report = RunReport()
    start = time.perf_counter()
    with progress_bar(total, description, progress) as advance:
        for batch in batches:
            for item, outcome in zip(batch, each_alone(batch, process), strict=True):
                if isinstance(outcome, BaseException):
                    report.failed.append((name(item), error_line(outcome)))
                    print(f"error: {error_line(outcome)}", file=sys.stderr)
                elif outcome is False:
                    report.skipped += 1
                else:
                    report.done += 1
            advance(len(batch))
    report.seconds = time.perf_counter() - start
    return report


R = TypeVar("R")


def each_alone(items: Sequence[T], run: Callable[[Sequence[T]], Sequence[R]]) -> list[R | BaseException]:
    """``run(items)``; when that raises one of :data:`ITEM_ERRORS`, ``run([item])`` for each item instead, so an
    error belongs to the item that causes it (a batch of one keeps its error)."""
    try:
        results = list(run(items))
    except ITEM_ERRORS as err:
        if len(items) == 1:
            return [err]
        results = []
        for item in items:
            try:
                results += run([item])
            except ITEM_ERRORS as one:
                results.append(one)
    if len(results) != len(items):
        raise RuntimeError(f"a batch of {len(items)} gave {len(results)} results")  # a bug, not bad input
    return results


def size_batches(
    items: Iterable[T],
    key: Callable[[T], Hashable | None],
    batch_size: int,
    max_items: Callable[[T], int] | None = None,
) -> list[list[T]]:
    """Items grouped by ``key`` (e.g. the image size: only same-size images stack into one tensor), in batches
    of up to ``batch_size`` (and ``max_items(first item)`` of its group, e.g. what memory allows).

    Groups keep the order of their first item, items their order within a group; an item whose key is None
    (its header could not be read) is a batch of its own, so its error is reported as without batching.
    """
    groups: dict[Hashable, list[T]] = {}
    for i, item in enumerate(items):
        k = key(item) if batch_size > 1 else None
        groups.setdefault(("alone", i) if k is None else ("key", k), []).append(item)
    batches = []
    for group in groups.values():
        n = max(1, min(batch_size, max_items(group[0]) if max_items else batch_size))
        batches += [group[i : i + n] for i in range(0, len(group), n)]
    return batches


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def writable_folder(path: Path, option: str = "--output") -> Path:
    """Prove ``path`` can be created and written, before any model loads, without leaving anything
    behind: a file in the way, a read-only folder or a full disk is a one-line error now, not a
    traceback after the work. The folder itself is created by the first output written into it."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} '{path}' exists and is not a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{option} '{path}' cannot be created: '{probe}' is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".tadm-write-check-"))
    except OSError as err:
        raise InputError(f"{option} '{path}' cannot be written: {err.strerror or err}") from err
    return path


def writable_file(path: str | Path, option: str = "--output") -> Path:
    """A file to be written (``tadm export``, ``tadm import-release``): not a folder, and its folder
    writable (:func:`writable_folder`), checked before any work."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{option} '{target}' is a folder; give the .safetensors file to write")
    writable_folder(target.expanduser().parent, option)
    return target


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """Checkpoint, device, precision and tiling options shared by downscale / upscale / evaluate."""
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
        "--weights",
        default=None,
        choices=("ema", "raw"),
        help="the trained weights' EMA or the raw ones (default: the EMA when the checkpoint has one)",
    )
    ap.add_argument(
        "--latent-tile", type=int, default=96, help="enhancer tile in latent pixels (0: whole image)"
    )
    ap.add_argument("--latent-overlap", type=int, default=32, help="enhancer tile overlap in latent pixels")
    ap.add_argument("--tile-batch", type=int, default=1, help="enhancer tiles per UNet call (raise on GPUs)")
    ap.add_argument("--vae-tile", type=int, default=768, help="VAE tile in image pixels (0: whole image)")
    ap.add_argument("--vae-overlap", type=int, default=128, help="VAE tile overlap in image pixels")
    ap.add_argument(
        "--vae-norm",
        default="synced",
        choices=("synced", "per_tile"),
        help="GroupNorm statistics of VAE tiles: shared by all tiles (default, TADM's release; one extra "
        "pass over the tiles) or each tile's own (faster; small tiles shift colours)",
    )
    ap.add_argument(
        "--vae-whole",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, decode an image larger than a VAE tile whole when the free memory allows (exact, no "
        "statistics pass; tiles if memory runs out); --no-vae-whole: always tiles",
    )
    ap.add_argument("--lr-tile", type=int, default=128, help="rescaler tile in LR pixels (0: whole image)")
    ap.add_argument(
        "--lr-overlap",
        type=int,
        default=None,
        help="rescaler tile context on each side in LR pixels, below half of --lr-tile (default: 16, or "
        "the most a smaller tile allows)",
    )
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPUs)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet, the rescaler's upscale, the aligner and the Refiner; the VAE stays eager "
        "(GPUs: fewer kernel launches; the first images of a new size pay for compiling)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_batch_size_argument(ap: argparse.ArgumentParser) -> None:
    """``--batch-size N`` of the commands that run many images (downscale, upscale, evaluate)."""
    ap.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images of the same size processed together (inputs are grouped by size; raise on GPUs for "
        "throughput; outputs as with 1, see docs/codec.md)",
    )


def add_color_fix_argument(ap: argparse.ArgumentParser) -> None:
    """``--color-fix none|wavelet|adain`` of the commands that reconstruct HR images (upscale, evaluate)."""
    from tadm.ops.color_fix import COLOR_FIXES

    ap.add_argument(
        "--color-fix",
        default="none",
        choices=COLOR_FIXES,
        help="colour correction of each reconstruction towards the bicubic upscale of its LR image, once on "
        "the whole image: none (default, as the paper), wavelet (keep the output's high frequencies, take "
        "the bicubic's low ones, as StableSR) or adain (match per-channel mean and std)",
    )


def tiling_from_args(args: argparse.Namespace) -> Tiling:
    """The tiling the command-line options describe (an unset --lr-overlap: Tiling's default, or the most
    a smaller --lr-tile allows)."""
    from tadm.inference.tiling import Tiling, max_stitch_overlap

    return Tiling(
        latent_tile=args.latent_tile,
        latent_overlap=args.latent_overlap if args.latent_tile > 0 else 0,
        tile_batch=args.tile_batch,
        vae_tile=args.vae_tile,
        vae_overlap=args.vae_overlap if args.vae_tile > 0 else 0,
        vae_norm=args.vae_norm,
        vae_whole=args.vae_whole,
        lr_tile=args.lr_tile,
        lr_overlap=min(Tiling.lr_overlap, max_stitch_overlap(args.lr_tile))
        if args.lr_overlap is None
        else args.lr_overlap,
    )


def load_from_args(args: argparse.Namespace) -> Codec:
    """The codec the command-line options describe."""
    from tadm.model.loading import load_codec

    return load_codec(
        args.ckpt,
        device=args.device,
        precision=args.precision,
        tiling=tiling_from_args(args),
        backbone_pretrained=args.backbone,
        channels_last=args.channels_last,
        compile=args.compile,
        color_fix=getattr(args, "color_fix", "none"),
        weights=args.weights,
    )
