"""The evaluation engine behind ``tadm evaluate``: HR images in, per-image metrics and a paper-style table out.

Decoupled from the model: a *method* is any function that takes an HR image (1, 3, H, W) in [-1, 1] and
returns its reconstruction of the same size (the TADM round trip, bicubic down + up, ...), so the same
engine scores checkpoints and baselines on identical inputs. A method may return ``(reconstruction, lr)``
instead, ``lr`` being the 8-bit LR image it made: the engine then records its size as a PNG per HR pixel
(``lr_bpp``, outside the timed call).

- :class:`~tadm.evaluation.scoring.Metrics` (:mod:`tadm.evaluation.scoring`) builds the metric networks
  once: PSNR-Y / SSIM-Y under a protocol, LPIPS and DISTS, and the Inception of FID and KID.
- :class:`Evaluation` times each method per image and collects an :class:`~tadm.evaluation.report.EvalReport`.

Every metric sees both images rounded to 8 bits, i.e. what a saved PNG would hold.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tadm.datamodules.inputs import BadImage, EvalImage
from tadm.evaluation.fid import KID_SUBSET_SIZE, FeatureStats, frechet_distance, kernel_inception_distance
from tadm.evaluation.report import EvalError, EvalReport, ImageRow
from tadm.evaluation.scoring import Metrics
from tadm.ops.color_fix import check_color_fix
from tadm.ops.images import quantize_unit_8bit, to_unit

#: HR image -> its reconstruction, or (reconstruction, the 8-bit LR image it went through)
Method = Callable[[Tensor], Tensor | tuple[Tensor, Tensor]]


class Evaluation:
    """Scores every method on each image it is given; :meth:`finish` makes the :class:`EvalReport`.

    Each method gets the HR image as (1, 3, H, W) in [-1, 1] on ``metrics.device`` and must return a
    reconstruction of the same shape; its call is timed (wall clock, CUDA synchronised; the first image
    includes any warm-up). Unreadable inputs and a method or metric failing on one image are recorded as
    errors and the run goes on, so one bad file does not cost the whole test set. The caller owns the
    loop (``tadm evaluate`` runs it under the commands' progress bar). ``color_fix`` names the colour
    correction the methods apply (:mod:`tadm.ops.color_fix`; the methods apply it, the report records it).

    ``batch_size`` > 1 runs each method on up to that many same-size images at once (B, 3, H, W): methods must
    then treat the samples of a batch independently (the codec's round trip and bicubic do). Images wait for
    others of their size among the next ``4 * batch_size`` (:meth:`finish` runs the rest); a batch a method
    fails on is retried image by image, so a failure is recorded for the image that causes it. Results are
    recorded in input order, so the report is the one batch size 1 makes, but for the timings (an image's
    seconds are its share of its batch's) and the rounding of kernels that a batch may choose differently.
    """

    def __init__(
        self,
        methods: Mapping[str, Method],
        metrics: Metrics,
        color_fix: str = "none",
        batch_size: int = 1,
    ) -> None:
        if not methods:
            raise ValueError("no methods to evaluate")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.methods = dict(methods)
        self.metrics = metrics
        self.batch_size = batch_size
        self.report = EvalReport(
            methods=list(methods), protocol=metrics.protocol, color_fix=check_color_fix(color_fix)
        )
        self._real = FeatureStats()
        self._fake = {name: FeatureStats() for name in methods}
        self._waiting: dict[tuple[int, ...], list[tuple[int, EvalImage]]] = {}  # same-size images by size
        self._results: dict[int, _ImageResult] = {}  # scored, not yet recorded (an earlier one is waiting)
        self._added = 0
        self._recorded = 0

    def add(self, item: EvalImage | BadImage) -> None:
        """Score one image with every method (or record why it could not be read); with ``batch_size`` > 1
        the image may wait for others of its size."""
        index = self._added
        self._added += 1
        if isinstance(item, BadImage):
            self._results[index] = _ImageResult(item.path, error=EvalError(item.path, None, item.reason))
        else:
            size = tuple(_as_batch(item.image).shape)
            group = self._waiting.setdefault(size, [])
            group.append((index, item))
            if len(group) >= self.batch_size:
                self._score(size)
            elif sum(len(g) for g in self._waiting.values()) > 4 * self.batch_size:
                self._score(
                    min(self._waiting, key=lambda k: self._waiting[k][0][0])
                )  # the oldest waits longest
        self._record()

    def flush(self) -> None:
        """Score the images still waiting for a full batch."""
        while self._waiting:
            self._score(min(self._waiting, key=lambda k: self._waiting[k][0][0]))
        self._record()

    def _score(self, size: tuple[int, ...]) -> None:
        group = self._waiting.pop(size)
        results = _score_images([item for _, item in group], self.methods, self.metrics)
        self._results.update(zip([index for index, _ in group], results, strict=True))

    def _record(self) -> None:
        """Record scored images in input order: rows, errors, and FID features (their order sets KID's subsets)."""
        while self._recorded in self._results:
            result = self._results.pop(self._recorded)
            self._recorded += 1
            if result.digest is not None:
                self.report.image_digests[result.path] = result.digest
            if result.error is not None:
                self.report.errors.append(result.error)
                continue
            if result.real_features is not None:
                self._real.add(result.real_features)
            for name, outcome in result.methods:
                if isinstance(outcome, EvalError):
                    self.report.errors.append(outcome)
                    continue
                row, features = outcome
                if features is not None:
                    self._fake[name].add(features)
                self.report.rows.append(row)

    def finish(self) -> EvalReport:
        """FID and KID per method and the notes on what was not computed; returns the report."""
        self.flush()
        report, metrics, real = self.report, self.metrics, self._real
        small_kid: dict[tuple[int, int], list[str]] = {}
        for name in self.methods:
            fake = self._fake[name]
            report.fid[name] = report.kid[name] = report.kid_std[name] = None
            if not metrics.fid:
                continue
            n = min(real.count, fake.count)
            if n < 2:
                report.notes.append(f"FID and KID of `{name}` are n/a: they need at least 2 images, got {n}.")
                continue
            report.fid[name] = frechet_distance(real, fake)
            try:
                kid = kernel_inception_distance(real, fake)
            except Exception as exc:  # KID is a second opinion: never lose the report over it
                report.notes.append(f"KID of `{name}` is n/a: {type(exc).__name__}: {exc}.")
                continue
            report.kid[name], report.kid_std[name] = kid.mean, kid.std
            if kid.subset_size < KID_SUBSET_SIZE:
                small_kid.setdefault((kid.subset_size, kid.subsets), []).append(f"`{name}`")
        for (size, subsets), names in small_kid.items():
            how = "all of them, once" if subsets == 1 else f"{subsets} random subsets"
            report.notes.append(
                f"KID of {', '.join(names)}: subsets of {size} images ({how}) instead of the usual "
                f"{KID_SUBSET_SIZE}, as the set is smaller: still unbiased, but noisier; compare KIDs "
                "over the same images only."
            )
        report.notes += [f"{what} not computed: {why}." for what, why in metrics.not_computed.items()]
        report.notes += metrics.caveats
        if self.batch_size > 1:
            report.notes.append(
                f"The methods ran on batches of up to {self.batch_size} same-size images: an image's seconds "
                "are its share of its batch's time."
            )
        return report


def evaluate(
    images: Iterable[EvalImage | BadImage],
    methods: Mapping[str, Method],
    metrics: Metrics,
    color_fix: str = "none",
    batch_size: int = 1,
) -> EvalReport:
    """Score every method on every image (see :class:`Evaluation`) and return the report."""
    evaluation = Evaluation(methods, metrics, color_fix, batch_size)
    for item in images:
        evaluation.add(item)
    return evaluation.finish()


#: a method's result on one image: its row and FID features, or why it has none
MethodOutcome = tuple[ImageRow, Tensor | None] | EvalError


@dataclass
class _ImageResult:
    """One image scored by every method, to be recorded in input order."""

    path: str
    digest: str | None = None
    error: EvalError | None = None  # unreadable, or its FID features failed: no method was run
    real_features: Tensor | None = None
    methods: list[tuple[str, MethodOutcome]] = field(default_factory=list)


def _as_batch(image: Tensor) -> Tensor:
    return image if image.dim() == 4 else image.unsqueeze(0)


def _score_images(
    items: list[EvalImage], methods: Mapping[str, Method], metrics: Metrics
) -> list[_ImageResult]:
    """Every method on the images (same size; together when more than one), then the metrics image by image."""
    xs = [_as_batch(item.image).to(metrics.device, torch.float32) for item in items]
    results = [_ImageResult(item.path, digest=image_digest(x)) for item, x in zip(items, xs, strict=True)]
    for result, x in zip(results, xs, strict=True):
        try:
            result.real_features = metrics.fid_features(x)
        except Exception as exc:
            result.error = EvalError(result.path, None, f"FID features failed: {type(exc).__name__}: {exc}")
    scored = [(result, x) for result, x in zip(results, xs, strict=True) if result.error is None]
    for name, method in methods.items():
        runs = _run_method(method, [x for _, x in scored], metrics.device)
        for (result, x), run in zip(scored, runs, strict=True):
            result.methods.append((name, _method_outcome(result.path, name, x, run, metrics)))
    return results


#: one image's run of a method: (reconstruction, LR image or None, seconds), or what it raised
Run = tuple[Tensor, Tensor | None, float] | Exception


def _run_method(method: Method, xs: list[Tensor], device: torch.device) -> list[Run]:
    """``method`` on the images stacked into one batch, split back per image (seconds shared evenly); when the
    batch fails or comes back in another shape, on each image alone, so an error belongs to its image."""
    if len(xs) > 1:
        try:
            pred, lr, seconds = _timed(method, torch.cat(xs), device)
            if pred.shape[0] != len(xs) or (lr is not None and lr.shape[0] != len(xs)):
                raise ValueError(f"the method returned {pred.shape[0]} images for a batch of {len(xs)}")
            return [
                (pred[i : i + 1], None if lr is None else lr[i : i + 1], seconds / len(xs))
                for i in range(len(xs))
            ]
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
    runs: list[Run] = []
    for x in xs:
        try:
            runs.append(_timed(method, x, device))
        except Exception as exc:  # one failure must not cost the rest of the test set
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            runs.append(exc)
    return runs


def _method_outcome(path: str, name: str, x: Tensor, run: Run, metrics: Metrics) -> MethodOutcome:
    """The row of one method on one image (its metrics and FID features), or the error that stopped it."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    try:
        if isinstance(run, Exception):
            raise run
        pred, lr, seconds = run
        lr_bpp = None if lr is None else png_bits(lr) / (height * width)
        if pred.shape != x.shape:
            raise ValueError(
                f"the method returned shape {tuple(pred.shape)} for an input of {tuple(x.shape)}"
            )
        if not torch.isfinite(pred).all():
            raise ValueError("the method returned non-finite values")
        values = metrics.image(pred, x)
        features = metrics.fid_features(pred)
    except Exception as exc:  # one failure must not cost the rest of the test set
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return EvalError(path, name, f"{type(exc).__name__}: {exc}")
    row = ImageRow(
        path,
        height,
        width,
        name,
        float(values["psnr_y"]),  # type: ignore[arg-type]
        float(values["ssim_y"]),  # type: ignore[arg-type]
        values["lpips"],
        values["dists"],
        seconds,
        lr_bpp,
    )
    return row, features


def image_digest(x: Tensor) -> str:
    """SHA-256 of an image's size and 8-bit pixels: the same picture read from any path gives the same digest."""
    u8 = _u8(x)
    return hashlib.sha256(f"{tuple(u8.shape)}|".encode() + u8.tobytes()).hexdigest()


def png_bits(lr: Tensor) -> int:
    """Size in bits of an 8-bit LR image (1,3,h,w) in [-1, 1] saved as an RGB PNG the way ``tadm downscale``
    saves it (compress level 6), without its text chunks (tadm's metadata, ~150 bytes per file)."""
    buf = io.BytesIO()
    Image.fromarray(_u8(lr), mode="RGB").save(buf, format="PNG", compress_level=6)
    return 8 * buf.tell()


def _u8(x: Tensor) -> np.ndarray:
    """(1,3,H,W) or (3,H,W) in [-1, 1] -> (H,W,3) uint8, as an 8-bit file stores it."""
    img = x[0] if x.dim() == 4 else x
    v = (quantize_unit_8bit(to_unit(img.detach().float())) * 255).round().to(torch.uint8)
    return v.permute(1, 2, 0).contiguous().cpu().numpy()


def _timed(method: Method, x: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None, float]:
    """Run ``method`` on a copy of ``x`` (so it cannot alter the reference) and time it; returns the
    reconstruction, the LR image when the method returned one, and the seconds.

    Under ``no_grad``: a bare module as a method would otherwise keep its autograd graph of a 2K-8K
    image alive; a method that needs gradients (guidance) turns them on itself (``torch.enable_grad``).
    """
    inp = x.clone()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = method(inp)
    _sync(device)
    seconds = time.perf_counter() - start
    if isinstance(out, tuple):
        recon, lr = out
        return recon.detach().float(), lr.detach(), seconds
    return out.detach().float(), None, seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
