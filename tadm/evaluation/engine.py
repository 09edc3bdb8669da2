"""Evaluation engine behind ``tadm test``: HR images in, per-image metrics and a paper-style table out.

Decoupled from the model: a *method* is any function that takes an HR image (1, 3, H, W) in [-1, 1] and
returns its reconstruction of the same size (the TADM round trip, bicubic down + up, ...), so the same
engine scores checkpoints and baselines on identical inputs.

- :func:`iter_hr_images` reads files, folders, glob patterns and WebDataset shards; an unreadable file
  becomes a :class:`BadImage` record instead of stopping the run.
- :class:`Metrics` builds the metric networks once: PSNR-Y / SSIM-Y (:mod:`tadm.evaluation.metrics`), LPIPS (VGG) and
  DISTS (:mod:`tadm.evaluation.perceptual`), and FID's Inception when ``torch-fidelity`` and its weights are present
  (otherwise FID is reported as ``n/a`` with the reason).
- :func:`evaluate` times each method per image and collects an :class:`EvalReport`, which writes
  ``per_image.csv`` and ``summary.md``.

Every metric sees both images rounded to 8 bits, i.e. what a saved PNG would hold.
"""

from __future__ import annotations

import copy
import csv
import glob
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tadm.datamodules.image_io import IMAGE_EXTENSIONS, ImageReadError, _walk_files, list_images, load_image
from tadm.datamodules.webdataset import (
    IMAGE_FIELDS,
    INDEX_NAME,
    META_FIELD,
    _local_path,
    count_samples,
    decode_image,
    expand_shards,
    index_for,
    iter_shard,
)
from tadm.evaluation.metrics import psnr_y, ssim_y
from tadm.ops.files import atomic_write_text
from tadm.ops.images import quantize_unit_8bit, to_unit

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"
CSV_COLUMNS = ("path", "height", "width", "method", "psnr_y", "ssim_y", "lpips", "dists", "seconds")
TABLE_HEADER = ("method", "images", "PSNR-Y", "SSIM-Y", "LPIPS", "DISTS", "FID", "s/image")
_GLOB_CHARS = frozenset("*?[")


#: LPIPS / DISTS pool VGG features 4-5 times: smaller images have no score
MIN_PERCEPTUAL_SIDE = 32


class MetricUnavailableWarning(UserWarning):
    """A metric cannot be computed in this environment (missing package or weights); it is reported n/a."""


# --------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class EvalImage:
    """One decoded HR image: ``path`` names its origin (a file, or ``shard.tar#relative/path.png``)."""

    path: str
    image: Tensor  # float32 (3, H, W) in [-1, 1]


@dataclass(frozen=True)
class BadImage:
    """An input that could not be read: the run goes on, and the report lists it and fails."""

    path: str
    reason: str


@dataclass(frozen=True)
class _Shard:
    url: str
    count: int | None  # samples, when an index.json or a cheap local scan says so


class HRImages:
    """The resolved inputs of :func:`iter_hr_images`: an iterator that also knows how many images to expect.

    Resolution happens up front so a misspelled input fails before any model time is spent, and the
    progress bar gets a total (``operator.length_hint``).
    """

    def __init__(self, sources: list[Path | _Shard]) -> None:
        self.sources = sources
        counts = [1 if isinstance(s, Path) else s.count for s in sources]
        self.total: int | None = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
        self._it = self._generate()

    def __iter__(self) -> Iterator[EvalImage | BadImage]:
        return self

    def __next__(self) -> EvalImage | BadImage:
        return next(self._it)

    def __length_hint__(self) -> int:
        return self.total or 0

    def _generate(self) -> Iterator[EvalImage | BadImage]:
        for source in self.sources:
            if isinstance(source, Path):
                try:
                    yield EvalImage(str(source), load_image(source))
                except ImageReadError as exc:
                    yield BadImage(str(source), str(exc))
            else:
                yield from _iter_shard_images(source.url)


def iter_hr_images(inputs: Sequence[str | os.PathLike[str]]) -> HRImages:
    """HR images from image files, folders (recursive), glob patterns and WebDataset ``.tar`` shards.

    A folder holding an ``index.json`` (written by ``tadm shard``) means its shards; any other folder
    means its image files and ``.tar`` shards. Brace patterns (``val-{000000..000003}.tar``) and remote
    shard URLs (``s3://``, ``pipe:``) are expanded by WebDataset's rules. Inputs are resolved now: a missing
    path, a glob without a match or an empty folder raises ``FileNotFoundError``/``ValueError`` naming it.
    Unreadable images and damaged shards are yielded as :class:`BadImage` when reached.
    """
    if not inputs:
        raise ValueError("no inputs given: pass image files, folders, glob patterns or .tar shards")
    sources: list[Path | _Shard] = []
    seen: set[str] = set()
    duplicates = 0
    for item in inputs:
        for source in _resolve(str(item)):
            ident = str(source.resolve()) if isinstance(source, Path) else source.url
            if ident in seen:
                duplicates += 1
                continue
            seen.add(ident)
            sources.append(source)
    if duplicates:
        warnings.warn(f"{duplicates} input(s) named more than once are evaluated once", stacklevel=2)
    return HRImages(sources)


def _resolve(item: str) -> list[Path | _Shard]:
    if _local_path(item) is None:  # s3://, https://, pipe:... -- existence is only known when read
        return _shards(expand_shards(item))
    path = Path(item).expanduser()
    if path.exists():
        return _resolve_existing(path)
    if any(c in _GLOB_CHARS for c in item):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches the input pattern '{item}'")
        out: list[Path | _Shard] = []
        for match in matches:
            out += _resolve_existing(Path(match))
        return out
    if "{" in item and "}" in item:  # WebDataset brace pattern
        urls = expand_shards(item)
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"input '{item}': shard '{missing[0]}' does not exist")
        return _shards(urls)
    raise FileNotFoundError(f"input '{item}' does not exist")


def _resolve_existing(path: Path) -> list[Path | _Shard]:
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _shards(expand_shards(str(path)))
        try:
            images = list_images(path)
        except ValueError:  # no image files: maybe a folder of shards
            images = []
        tars = sorted(p for p in _walk_files(path) if p.suffix.lower() == ".tar")
        if not images and not tars:
            raise ValueError(
                f"input folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards"
            )
        return [*images, *_shards([str(t) for t in tars])]
    if path.name == INDEX_NAME:
        return _shards(expand_shards(str(path)))
    if path.suffix.lower() == ".tar":
        return _shards([str(path)])
    return [path]  # any other file is read as an image; if it is not one, it becomes a BadImage


def _shards(urls: list[str]) -> list[Path | _Shard]:
    """Shards with their sample counts: from ``index.json`` when listed there, else a header-only scan."""
    if not urls:
        return []
    info = index_for(urls)
    if info is not None:
        return [_Shard(u, c) for u, c in zip(urls, info.counts, strict=True)]
    out: list[Path | _Shard] = []
    for url in urls:
        count: int | None = None
        if _local_path(url) is not None:
            try:
                count = count_samples(url)
            except (OSError, ValueError):
                count = None  # reading it later reports the problem as a BadImage
        out.append(_Shard(url, count))
    return out


def _iter_shard_images(url: str) -> Iterator[EvalImage | BadImage]:
    """Decode every sample of one shard; bad samples and a damaged shard become :class:`BadImage`.

    Read with the project's tar reader rather than ``webdataset.WebDataset``: WebDataset silently drops the
    rest of a truncated shard, which would shrink a test set without anyone noticing.
    """
    shard_errors: list[str] = []
    for _pos, key, fields in iter_shard(url, shard_errors.append):
        ext = next((e for e in IMAGE_FIELDS if e in fields), None)
        if ext is None:
            yield BadImage(
                f"{url}#{key}",
                f"sample has no image field (fields: {sorted(fields)}; expected {IMAGE_FIELDS})",
            )
            continue
        name = f"{url}#{_original_path(fields) or f'{key}.{ext}'}"
        try:
            yield EvalImage(name, decode_image(fields[ext], name))
        except ImageReadError as exc:
            yield BadImage(name, str(exc))
    for message in shard_errors:
        yield BadImage(url, message)


def _original_path(fields: dict[str, bytes]) -> str | None:
    """The source path ``tadm shard`` stored in the sample's ``.json`` (keys are sanitised, paths are not)."""
    try:
        meta = json.loads(fields.get(META_FIELD, b"{}").decode("utf-8"))
    except ValueError:
        return None
    path = meta.get("path") if isinstance(meta, dict) else None
    return path if isinstance(path, str) and path else None


# --------------------------------------------------------------------------------------------------------
# Metrics


def _load_fid_inception(weights: str | None) -> nn.Module:
    """torchmetrics' FID Inception (2048 features, takes uint8 images of any size); raises when unavailable."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).inception


def fid_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


class Metrics:
    """The metric networks, built once and reused for every image and method.

    Args:
        device: Where the networks run; :func:`evaluate` also hands images to the methods there (use the
            model's device).
        perceptual: Compute LPIPS (VGG) and DISTS. Offline they need torchvision's VGG16 ImageNet weights
            in ``$TORCH_HOME/hub/checkpoints/``; missing weights raise an error naming the file.
        fid: Compute FID when possible (package ``torch-fidelity`` and its Inception weights); otherwise
            warn once with the reason and report it as n/a.
        fid_weights: Explicit path of the FID Inception weights (default: the torch hub cache).
        fid_feature: A feature network used instead of FID's Inception (uint8 (B,3,H,W) -> (B,D)), e.g. a
            DINOv2 or CLIP encoder for a Frechet distance in its feature space; the summary then says that
            the value is not comparable with Inception FIDs.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        perceptual: bool = True,
        fid: bool = True,
        fid_weights: str | os.PathLike[str] | None = None,
        fid_feature: nn.Module | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.not_computed: dict[str, str] = {}
        """Metric group ("LPIPS/DISTS", "FID") -> why it is not computed; the summary prints these."""
        self.caveats: list[str] = []
        self._perceptual: nn.Module | None = None
        self._perceptual_cpu: nn.Module | None = None
        if perceptual:
            from tadm.evaluation.perceptual import PerceptualLoss

            try:
                net = PerceptualLoss(1.0, 1.0)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err} To evaluate without LPIPS/DISTS, turn them off.") from err
            self._perceptual = net.to(self.device)
        else:
            self.not_computed["LPIPS/DISTS"] = "turned off"
        self._fid: nn.Module | None = None
        if fid_feature is not None:
            self._fid = fid_feature.to(self.device).eval()
            self.caveats.append(
                f"FID uses the feature network {type(fid_feature).__name__} instead of Inception: "
                "not comparable with published FIDs."
            )
        elif fid:
            self._fid = self._build_fid(None if fid_weights is None else str(fid_weights))
        else:
            self.not_computed["FID"] = "turned off"

    @property
    def perceptual(self) -> bool:
        return self._perceptual is not None

    @property
    def fid(self) -> bool:
        return self._fid is not None

    def _build_fid(self, weights: str | None) -> nn.Module | None:
        target = weights or str(fid_weights_path())
        try:
            net = _load_fid_inception(weights)
        except ModuleNotFoundError:
            reason = (
                "the package torch-fidelity is not installed (torchmetrics' FID needs it): "
                "`pip install 'tadm[fid]'` or `pip install torch-fidelity`"
            )
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            reason = (
                f"torch-fidelity's FID Inception weights are missing or unreadable: looked for '{target}' "
                f"({type(err).__name__}: {err}). Download {FID_WEIGHTS_URL} on a connected machine and copy "
                f"{FID_WEIGHTS_FILE} to '{Path(target).parent}/'"
            )
        else:
            return net.to(self.device).eval()
        self.not_computed["FID"] = reason
        warnings.warn(f"FID is not computed: {reason}", MetricUnavailableWarning, stacklevel=3)
        return None

    @torch.no_grad()
    def image(self, pred: Tensor, target: Tensor) -> dict[str, float | None]:
        """PSNR-Y, SSIM-Y, LPIPS and DISTS (None when off) of one (1,3,H,W) pair in [-1, 1]."""
        p, t = _as_8bit(pred.to(self.device)), _as_8bit(target.to(self.device))
        with _fp32(self.device):
            values: dict[str, float | None] = {
                "psnr_y": float(psnr_y(p, t)[0]),
                "ssim_y": float(ssim_y(p, t)[0]),
                "lpips": None,
                "dists": None,
            }
            if self._perceptual is not None and min(p.shape[-2:]) >= MIN_PERCEPTUAL_SIDE:
                values["lpips"], values["dists"] = self._perceptual_values(p, t)
            elif self._perceptual is not None:
                note = (
                    f"LPIPS/DISTS are undefined for images under {MIN_PERCEPTUAL_SIDE} px (VGG pooling): "
                    "left empty for such images and out of the means"
                )
                if note not in self.caveats:
                    self.caveats.append(note)
        return values

    def _perceptual_values(self, p: Tensor, t: Tensor) -> tuple[float, float]:
        """LPIPS and DISTS; a GPU out-of-memory error (8K images) retries the image on the CPU."""
        assert self._perceptual is not None
        try:
            return _lpips_dists(self._perceptual, p, t)
        except torch.cuda.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
        torch.cuda.empty_cache()
        if self._perceptual_cpu is None:
            warnings.warn(
                f"LPIPS/DISTS ran out of memory on {self.device} for a {p.shape[-2]}x{p.shape[-1]} image; "
                "such images are scored on the CPU (slower, same values)",
                stacklevel=3,
            )
            self._perceptual_cpu = copy.deepcopy(self._perceptual).cpu()
        return _lpips_dists(self._perceptual_cpu, p.cpu(), t.cpu())

    @torch.no_grad()
    def fid_features(self, images: Tensor) -> Tensor | None:
        """FID features (B, D) of images in [-1, 1], as float64 on the CPU; None when FID is off."""
        if self._fid is None:
            return None
        u8 = (quantize_unit_8bit(to_unit(images.to(self.device).float())) * 255).round().to(torch.uint8)
        with _fp32(self.device):
            return self._fid(u8).double().cpu()


def _as_8bit(x: Tensor) -> Tensor:
    return quantize_unit_8bit(to_unit(x.float())) * 2.0 - 1.0


def _lpips_dists(net: nn.Module, p: Tensor, t: Tensor) -> tuple[float, float]:
    lpips_value = net.lpips(p, t).flatten()[0]
    dists_value = net.dists((p + 1) / 2, (t + 1) / 2).flatten()[0]
    return float(lpips_value), float(dists_value)


def _fp32(device: torch.device) -> torch.autocast:
    """Autocast off, in case the caller runs the model under mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)


class _FeatureStats:
    """Running sum and outer-product sum of features: FID without keeping every feature vector."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, features: Tensor) -> None:
        f = features.double().reshape(features.shape[0], -1)
        s, o = f.sum(0), f.T @ f
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += f.shape[0]

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.outer is not None and self.count >= 2
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(real: _FeatureStats, fake: _FeatureStats) -> float:
    """FID between two feature sets, with torchmetrics' formula (eigenvalues of the covariance product)."""
    mu1, s1 = fake.mean_cov()
    mu2, s2 = real.mean_cov()
    a = (mu1 - mu2).square().sum()
    b = s1.trace() + s2.trace()
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(a + b - 2 * c)


# --------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class ImageRow:
    """One image scored with one method (a row of ``per_image.csv``)."""

    path: str
    height: int
    width: int
    method: str
    psnr_y: float
    ssim_y: float
    lpips: float | None
    dists: float | None
    seconds: float


@dataclass(frozen=True)
class EvalError:
    """An image that was not scored: unreadable (``method`` None) or a method/metric failed on it."""

    path: str
    method: str | None
    reason: str


@dataclass(frozen=True)
class MethodSummary:
    """Means over the images a method was scored on (None: not computed)."""

    method: str
    images: int
    psnr_y: float | None
    ssim_y: float | None
    lpips: float | None
    dists: float | None
    fid: float | None
    seconds: float | None


@dataclass
class EvalReport:
    """Everything ``tadm test`` reports: per-image rows, failures, FID per method and notes."""

    methods: list[str]
    rows: list[ImageRow] = field(default_factory=list)
    errors: list[EvalError] = field(default_factory=list)
    fid: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when any input or method failed: the command should exit non-zero."""
        return bool(self.errors)

    def summary(self) -> list[MethodSummary]:
        out = []
        for method in self.methods:
            rows = [r for r in self.rows if r.method == method]
            out.append(
                MethodSummary(
                    method,
                    len(rows),
                    _mean([r.psnr_y for r in rows]),
                    _mean([r.ssim_y for r in rows]),
                    _mean([r.lpips for r in rows]),
                    _mean([r.dists for r in rows]),
                    self.fid.get(method),
                    _mean([r.seconds for r in rows]),
                )
            )
        return out

    def markdown(self) -> str:
        """The summary table (means over images) and a line per failure or metric not computed."""
        lines = [
            "| " + " | ".join(TABLE_HEADER) + " |",
            "|---|" + "---:|" * (len(TABLE_HEADER) - 1),
        ]
        for s in self.summary():
            cells = [
                s.method,
                str(s.images),
                _fmt(s.psnr_y, 2),
                _fmt(s.ssim_y, 4),
                _fmt(s.lpips, 4),
                _fmt(s.dists, 4),
                _fmt(s.fid, 2),
                _fmt(s.seconds, 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Means over images. PSNR-Y/SSIM-Y: Y channel (BT.601), 8-bit, full image, no border crop; "
            "LPIPS: VGG; s/image: wall clock of the method's round trip.",
        ]
        for method in self.methods:
            n_inf = sum(1 for r in self.rows if r.method == method and math.isinf(r.psnr_y))
            if n_inf:
                lines.append(
                    f"PSNR-Y of `{method}` is inf on {n_inf} image(s) (identical to the HR image after 8-bit "
                    "rounding), so its mean is inf; per-image values are in per_image.csv."
                )
        lines += self.notes
        unreadable = [e for e in self.errors if e.method is None]
        failed = [e for e in self.errors if e.method is not None]
        if unreadable:
            lines.append(f"Failed: {len(unreadable)} input(s) could not be read and are not in the table:")
            lines += [f"- `{e.path}`: {e.reason}" for e in unreadable]
        if failed:
            lines.append(f"Failed: {len(failed)} image/method pair(s) could not be scored:")
            lines += [f"- `{e.path}` with `{e.method}`: {e.reason}" for e in failed]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: str | os.PathLike[str]) -> str:
        """Write ``per_image.csv`` and ``summary.md`` (each atomically) to ``output_dir``; return the Markdown."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in self.rows:
            writer.writerow(
                [r.path, r.height, r.width, r.method]
                + [_csv_float(v) for v in (r.psnr_y, r.ssim_y, r.lpips, r.dists, r.seconds)]
            )
        text = self.markdown()
        atomic_write_text(out / "per_image.csv", buf.getvalue())
        atomic_write_text(out / "summary.md", text)
        return text


class Evaluation:
    """Scores every method on each image it is given; :meth:`finish` makes the :class:`EvalReport`.

    Each method gets the HR image as (1, 3, H, W) in [-1, 1] on ``metrics.device`` and must return a
    reconstruction of the same shape; its call is timed (wall clock, CUDA synchronised; the first image
    includes any warm-up). Unreadable inputs and a method or metric failing on one image are recorded as
    errors and the run goes on, so one bad file does not cost the whole test set. The caller owns the
    loop (``tadm evaluate`` runs it under the commands' progress bar).
    """

    def __init__(self, methods: Mapping[str, Callable[[Tensor], Tensor]], metrics: Metrics) -> None:
        if not methods:
            raise ValueError("no methods to evaluate")
        self.methods = dict(methods)
        self.metrics = metrics
        self.report = EvalReport(methods=list(methods))
        self._real = _FeatureStats()
        self._fake = {name: _FeatureStats() for name in methods}

    def add(self, item: EvalImage | BadImage) -> None:
        """Score one image with every method (or record why it could not be read)."""
        if isinstance(item, BadImage):
            self.report.errors.append(EvalError(item.path, None, item.reason))
        else:
            _evaluate_one(item, self.methods, self.metrics, self.report, self._real, self._fake)

    def finish(self) -> EvalReport:
        """FID per method and the notes on what was not computed; returns the report."""
        report, metrics, real = self.report, self.metrics, self._real
        for name in self.methods:
            fake = self._fake[name]
            if not metrics.fid:
                report.fid[name] = None
            elif min(real.count, fake.count) < 2:
                report.fid[name] = None
                report.notes.append(
                    f"FID of `{name}` is n/a: FID needs at least 2 images, got {min(real.count, fake.count)}."
                )
            else:
                report.fid[name] = frechet_distance(real, fake)
        report.notes += [f"{what} not computed: {why}." for what, why in metrics.not_computed.items()]
        report.notes += metrics.caveats
        return report


def evaluate(
    images: Iterable[EvalImage | BadImage],
    methods: Mapping[str, Callable[[Tensor], Tensor]],
    metrics: Metrics,
) -> EvalReport:
    """Score every method on every image (see :class:`Evaluation`) and return the report."""
    evaluation = Evaluation(methods, metrics)
    for item in images:
        evaluation.add(item)
    return evaluation.finish()


def _evaluate_one(
    item: EvalImage,
    methods: Mapping[str, Callable[[Tensor], Tensor]],
    metrics: Metrics,
    report: EvalReport,
    real: _FeatureStats,
    fake: dict[str, _FeatureStats],
) -> None:
    x = item.image if item.image.dim() == 4 else item.image.unsqueeze(0)
    x = x.to(metrics.device, torch.float32)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    try:
        real_features = metrics.fid_features(x)
    except Exception as exc:
        report.errors.append(EvalError(item.path, None, f"FID features failed: {type(exc).__name__}: {exc}"))
        return
    if real_features is not None:
        real.add(real_features)
    for name, method in methods.items():
        try:
            pred, seconds = _timed(method, x, metrics.device)
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
            report.errors.append(EvalError(item.path, name, f"{type(exc).__name__}: {exc}"))
            continue
        if features is not None:
            fake[name].add(features)
        report.rows.append(
            ImageRow(
                item.path,
                height,
                width,
                name,
                float(values["psnr_y"]),  # type: ignore[arg-type]
                float(values["ssim_y"]),  # type: ignore[arg-type]
                values["lpips"],
                values["dists"],
                seconds,
            )
        )


def _timed(method: Callable[[Tensor], Tensor], x: Tensor, device: torch.device) -> tuple[Tensor, float]:
    """Run ``method`` on a copy of ``x`` (so it cannot alter the reference) and time it.

    Under ``no_grad``: a bare module as a method would otherwise keep its autograd graph of a 2K-8K
    image alive; a method that needs gradients (guidance) turns them on itself (``torch.enable_grad``).
    """
    inp = x.clone()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = method(inp)
    _sync(device)
    return out.detach().float(), time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# Formatting and files


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def _fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"


def _csv_float(value: float | None) -> str:
    return "" if value is None else repr(float(value))  # repr: exact round trip; inf -> "inf"
