"""What ``tadm demo`` computes, without gradio: a photo through the codec as the commands run it, and an LR
file restored alone, with the files, scores and notes the page shows.

The work is the commands' own code, not a copy: ``Codec.downscale`` and ``write_lr`` (the LR file is the one
``tadm downscale`` writes, byte for byte), ``read_lr`` + ``Codec.target_size`` + ``Codec.upscale`` on that file
(``tadm upscale``, with its ``timestep_panel`` heat map), ``bicubic_round_trip`` and the ``Metrics`` of
``tadm evaluate`` under its default protocol (so PSNR-Y / SSIM-Y equal ``tadm evaluate``'s for the photo).
Large photos go through the codec's tiling, as in the commands; one job runs at a time, so the demo needs no
more memory than the CLI.

Every problem a user can cause is a :class:`~tadm.demo.uploads.DemoError` with one line naming the file; the
page shows it and the next upload works. A running job reports each tile (``progress(fraction, text)``) and
stops at the next tile once ``cancel`` is set (:class:`~tadm.demo.jobs.Cancelled`). The results it returns are
:mod:`tadm.demo.results`.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tadm.datamodules.image_io import ImageReadError, image_size
from tadm.demo import DEFAULT_MAX_MEGAPIXELS
from tadm.demo.jobs import Cancelled, Job, ProgressFn
from tadm.demo.results import PhotoResult, RestoreResult, Scores
from tadm.demo.uploads import DemoError, check_photo, read_error_line, read_photo, safe_stem
from tadm.errors import LRFileError
from tadm.evaluation.perceptual import vgg16_weights_path
from tadm.evaluation.protocols import get_protocol
from tadm.evaluation.scoring import MIN_PERCEPTUAL_SIDE, Metrics
from tadm.inference.codec import DEFAULT_MAX_HR_SIDE, Codec
from tadm.inference.heatmap import timestep_panel
from tadm.inference.lr_files import LRMeta, read_lr, to_uint8, write_lr, write_png
from tadm.inference.pipeline import bicubic_round_trip

#: LPIPS / DISTS run VGG16 on the whole image: above this they are skipped (GBs of activations; slow on a CPU)
PERCEPTUAL_MAX_MEGAPIXELS = 2.0
#: ``round_trip(scores=None)`` scores photos up to this size at once (well under a second), larger ones later
INLINE_SCORES_MEGAPIXELS = 1.0
#: result folders kept on disk (older ones are deleted; the page has already been sent its files)
KEEP_RESULTS = 16


@dataclass
class _Restored:
    image: Tensor
    timesteps: Tensor | None


class Demo:
    """A loaded codec serving the page: :meth:`round_trip` for photos, :meth:`restore` for LR files.

    Args:
        codec: the checkpoint loaded as the commands load it (``load_codec``: tiling, precision, device,
            colour fix).
        work_dir: where result files go (one folder per job; the newest :data:`KEEP_RESULTS` are kept).
        max_megapixels: photos (and restored LR files) above this are refused with a message.
        max_hr_side: ``tadm upscale --max-hr-side``: an LR file without tadm metadata whose restored longer
            side would pass this is refused as a full-size image.
        perceptual: compute LPIPS / DISTS when torchvision's VGG16 weights are present (never downloads).
    """

    def __init__(
        self,
        codec: Codec,
        work_dir: str | Path,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        max_hr_side: int = DEFAULT_MAX_HR_SIDE,
        perceptual: bool = True,
    ) -> None:
        if max_megapixels <= 0:
            raise ValueError(f"max_megapixels must be > 0, got {max_megapixels}")
        self.codec = codec
        self.work_dir = Path(work_dir)
        self.max_pixels = int(max_megapixels * 1e6)
        self.max_megapixels = max_megapixels
        self.max_hr_side = max_hr_side
        self._lock = threading.Lock()  # one job at a time: memory stays what one CLI call needs
        self._jobs = 0
        protocol = get_protocol("tadm", codec.scale)  # `tadm evaluate`'s default
        self.metrics = Metrics(codec.device, perceptual=False, fid=False, protocol=protocol)
        self.perceptual_metrics: Metrics | None = None
        self.perceptual_note = "LPIPS/DISTS: turned off"
        if perceptual:
            self.perceptual_metrics, self.perceptual_note = _perceptual_metrics(codec, protocol)

    def warm_up(self) -> None:
        """One tiny round trip and one score first, so the first upload's time excludes one-off set-up
        (torchmetrics' import, kernels), as ``tadm evaluate`` does before it times anything."""
        k = self.codec.pad_multiple * 2
        x = torch.zeros(1, 3, k, k)
        with self._lock:
            if not self._needs_hr():
                y, size = self.codec.downscale(x)
                self.codec.upscale(y, size)
            for metrics in (self.metrics, self.perceptual_metrics):
                if metrics is not None:
                    metrics.image(x, x)

    # ------------------------------------------------------------------ facts for the page
    @property
    def has_enhancer(self) -> bool:
        return self.codec.module.aligner is not None

    def describe(self) -> str:
        """One line on the loaded model."""
        m = self.codec.module
        stage = getattr(m, "stage", "")
        aligner = f", aligner {type(m.aligner).__name__}" if m.aligner is not None else ""
        return (
            f"{Path(self.codec.source).name} · x{self.codec.scale} · stage {stage}{aligner} · backbone "
            f"{type(m.backbone).__name__} · model id {self.codec.model_id[:8]} · {self.codec.device}"
        )

    # ------------------------------------------------------------------ the sending side + the round trip
    def round_trip(
        self,
        path: str | Path,
        name: str | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        scores: bool | None = True,
    ) -> PhotoResult:
        """Photo -> the LR file ``tadm downscale`` writes -> the photo ``tadm upscale`` restores from it; bicubic
        down + up beside it; both scored against the photo as ``tadm evaluate`` scores them. ``scores=False``:
        scored later by :meth:`score` on the result's images (the same numbers), so that a page shows a large
        photo's images first; None: inline up to :data:`INLINE_SCORES_MEGAPIXELS`, later above."""
        name = name or Path(path).name
        notes = check_photo(path, name, self.max_pixels, self.max_megapixels)
        x = read_photo(path, name)[None]
        h, w = x.shape[-2:]
        if min(h, w) < self.codec.scale:
            notes.append(
                f"{w}x{h} px is smaller than one LR pixel at x{self.codec.scale}: the codec pads it (reflect) to "
                f"{self.codec.pad_multiple} px per side first, and its scores say little about so few pixels"
            )
        if scores is None:
            scores = h * w <= INLINE_SCORES_MEGAPIXELS * 1e6
        with self._job(name, progress, cancel, _PHOTO_PHASES) as (job, out):
            job.plan((h, w))
            job.phase("downscale")
            start = time.perf_counter()
            y, (hh, ww) = self.codec.downscale(x)
            lr_file = write_lr(
                out / f"{safe_stem(name)}.lr.png",
                y,
                LRMeta(hh, ww, self.codec.scale, self.codec.rescaler_id, self.codec.model_id),
            )
            t_down = time.perf_counter() - start
            job.phase("restore")
            start = time.perf_counter()
            if self._needs_hr():  # analysis aligner: only `tadm evaluate`'s round trip can run it
                trip = self.codec.round_trip(x)
                up = _Restored(trip.reconstruction, trip.timesteps)
                notes.append(
                    f"this checkpoint's aligner ({type(self.codec.module.aligner).__name__}) reads the HR image: "
                    "the restored image is `tadm evaluate`'s round trip; `tadm upscale` cannot restore the LR file"
                )
            else:
                y_file, meta = read_lr(lr_file)  # the receiving side starts from the file, as `tadm upscale`
                size = self.codec.target_size(y_file, meta, name, self.max_hr_side)
                out_up = self.codec.upscale(y_file, size)
                up = _Restored(out_up.image, out_up.timesteps)
            restored_file = write_png(out / f"{safe_stem(name)}.restored.png", up.image)
            t_up = time.perf_counter() - start
            job.phase("scores")
            start = time.perf_counter()
            bicubic = bicubic_round_trip(x.to(self.codec.device), self.codec.scale)
            scored = {}  # LPIPS / DISTS come after the result (:meth:`perceptual`): VGG16 takes seconds on a CPU
            if scores:
                scored = {
                    "restored": self.metrics.image(up.image, x),
                    "bicubic": self.metrics.image(bicubic, x),
                }
            t_scores = time.perf_counter() - start
            heat = self._heat_map(up.timesteps, (h, w), out / f"{safe_stem(name)}.restored.timesteps.png")
        return PhotoResult(
            name=name,
            original=to_uint8(x),
            lr=to_uint8(y),
            lr_file=lr_file,
            restored=to_uint8(up.image),
            restored_file=restored_file,
            bicubic=to_uint8(bicubic),
            scores={method: Scores.from_metrics(values) for method, values in scored.items()},
            notes=notes,
            seconds={"downscale": t_down, "upscale": t_up, **({"scores": t_scores} if scores else {})},
            **heat,
        )

    # ------------------------------------------------------------------ the receiving side
    def restore(
        self,
        path: str | Path,
        name: str | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> RestoreResult:
        """An LR file alone -> the photo at its original size, as ``tadm upscale`` restores it."""
        name = name or Path(path).name
        try:
            h, w = image_size(path)  # the header first: a huge file is refused before it is decoded
            if h * w > self.max_pixels:
                raise DemoError(
                    f"{name}: a {w}x{h} px image is no LR file this demo restores (it is above the limit of "
                    f"{self.max_megapixels:g} MP for the restored photo already)"
                )
            y, meta = read_lr(path)
        except ImageReadError as err:
            raise DemoError(read_error_line(err, name)) from err
        notes: list[str] = []
        if self._needs_hr():
            raise DemoError(
                f"{name}: this checkpoint's aligner ({type(self.codec.module.aligner).__name__}) needs the HR "
                "image, so it cannot restore an LR file alone; use the photo tab"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                size = self.codec.target_size(y, meta, name, self.max_hr_side)
            except LRFileError as err:  # another model's or scale's file, a resized one, a full-size photo
                raise DemoError(str(err)) from err
        notes += [str(w.message) for w in caught]
        hh, ww = size
        if hh * ww > self.max_pixels:
            raise DemoError(
                f"{name}: restoring it gives a {ww}x{hh} px image ({hh * ww / 1e6:.1f} MP), above this demo's "
                f"limit of {self.max_megapixels:g} MP (`tadm demo --max-megapixels`); `tadm upscale` takes any size"
            )
        with self._job(name, progress, cancel, {"restore": (0.0, 1.0)}) as (job, out):
            job.plan(size)
            job.phase("restore")
            start = time.perf_counter()
            up = self.codec.upscale(y, size)
            restored_file = write_png(out / f"{safe_stem(name)}.restored.png", up.image)
            seconds = {"upscale": time.perf_counter() - start}
            heat = self._heat_map(up.timesteps, size, out / f"{safe_stem(name)}.restored.timesteps.png")
        return RestoreResult(
            name=name,
            lr=to_uint8(y),
            restored=to_uint8(up.image),
            restored_file=restored_file,
            notes=notes,
            seconds=seconds,
            **heat,
        )

    # ------------------------------------------------------------------ helpers
    def _needs_hr(self) -> bool:
        aligner = self.codec.module.aligner
        return aligner is not None and aligner.needs_true_latent

    def score(
        self,
        original: np.ndarray,
        restored: np.ndarray,
        bicubic: np.ndarray,
        cancel: threading.Event | None = None,
    ) -> dict[str, Scores]:
        """PSNR-Y and SSIM-Y of a round trip's restored and bicubic images against the original, from their 8-bit
        pixels ((H, W, 3) uint8, as :class:`PhotoResult` holds them and the page's files store them): the
        metrics round both images to 8 bits first, so these equal ``round_trip``'s and ``tadm evaluate``'s
        bit for bit."""
        return self._score(self.metrics, original, restored, bicubic, cancel)

    def _score(
        self,
        metrics: Metrics,
        original: np.ndarray,
        restored: np.ndarray,
        bicubic: np.ndarray,
        cancel: threading.Event | None,
    ) -> dict[str, Scores]:
        x = _from_uint8(original)
        scores = {}
        with self._lock:
            for method, image in (("restored", restored), ("bicubic", bicubic)):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("stopped")
                scores[method] = Scores.from_metrics(metrics.image(_from_uint8(image), x))
        return scores

    def perceptual(
        self,
        original: np.ndarray,
        restored: np.ndarray,
        bicubic: np.ndarray,
        cancel: threading.Event | None = None,
    ) -> dict[str, Scores] | None:
        """PSNR-Y, SSIM-Y, LPIPS and DISTS of a round trip's restored and bicubic images ((H, W, 3) uint8, as
        :class:`PhotoResult` holds them and the page's files store them) against the original, as
        ``tadm evaluate`` scores them (the metrics see 8-bit images either way); None when
        :meth:`perceptual_reason` gives a reason not to."""
        if self.perceptual_reason((int(original.shape[0]), int(original.shape[1]))) is not None:
            return None
        assert self.perceptual_metrics is not None
        return self._score(self.perceptual_metrics, original, restored, bicubic, cancel)

    def perceptual_reason(self, hr_size: tuple[int, int]) -> str | None:
        """Why a photo of ``hr_size`` (H, W) gets no LPIPS / DISTS (None: it gets them)."""
        if self.perceptual_metrics is None:
            return self.perceptual_note
        h, w = hr_size
        if h * w > PERCEPTUAL_MAX_MEGAPIXELS * 1e6:
            return (
                f"LPIPS/DISTS: not computed above {PERCEPTUAL_MAX_MEGAPIXELS:g} MP (VGG16 on the whole image needs "
                "GBs); `tadm evaluate` computes them"
            )
        if min(h, w) < MIN_PERCEPTUAL_SIDE:
            return f"LPIPS/DISTS: undefined under {MIN_PERCEPTUAL_SIDE} px (VGG pooling)"
        return None

    def _heat_map(self, timesteps: Tensor | None, size: tuple[int, int], dest: Path) -> dict[str, Any]:
        """``tadm upscale --save-timesteps``'s heat map of the enhancer's timesteps (nothing without one)."""
        aligner = self.codec.module.aligner
        if timesteps is None or aligner is None:
            return {}
        factor = self.codec.module.backbone.downsample_factor
        heat = timestep_panel(timesteps, factor, size, aligner.t_min, aligner.t_max)
        file = write_png(dest, heat * 2 - 1)
        return {
            "timesteps": to_uint8(heat * 2 - 1),
            "timesteps_file": file,
            "timestep_range": (float(timesteps.min()), float(timesteps.max())),
            "aligner_range": (aligner.t_min, aligner.t_max),
        }

    @contextlib.contextmanager
    def _job(
        self,
        name: str,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        phases: dict[str, tuple[float, float]],
    ) -> Iterator[tuple[Job, Path]]:
        """One job at a time, reporting tiles and honouring Stop; its own result folder; no partial results:
        a job that fails or is stopped leaves no folder."""
        with self._lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopped")
            self._jobs += 1
            out = self.work_dir / f"{self._jobs:05d}-{safe_stem(name)}"
            out.mkdir(parents=True, exist_ok=True)
            job = Job(self.codec, progress, cancel, phases)
            try:
                with job.instrumented():
                    yield job, out
            except (MemoryError, torch.cuda.OutOfMemoryError) as err:
                shutil.rmtree(out, ignore_errors=True)
                raise DemoError(
                    f"{name}: ran out of memory ({type(err).__name__}); try a smaller photo, smaller tiles "
                    "(`tadm demo --latent-tile 64 --vae-tile 512`) or a lower --max-megapixels"
                ) from err
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
            finally:
                if self.codec.device.type == "cuda":
                    torch.cuda.empty_cache()
            job.report(1.0, "done")
            self._prune()

    def _prune(self) -> None:
        folders = sorted(p for p in self.work_dir.iterdir() if p.is_dir())
        for old in folders[:-KEEP_RESULTS]:
            shutil.rmtree(old, ignore_errors=True)


#: each phase's share of a photo's progress bar
_PHOTO_PHASES = {"downscale": (0.0, 0.35), "restore": (0.35, 0.9), "scores": (0.9, 1.0)}


def _perceptual_metrics(codec: Codec, protocol: Any) -> tuple[Metrics | None, str]:
    """Metrics with LPIPS / DISTS when the VGG16 weights are on disk (never downloaded), else why not."""
    weights = vgg16_weights_path()
    if not weights.is_file():
        return None, f"LPIPS/DISTS: off, no VGG16 weights ({weights.name} in torch's hub cache; docs/demo.md)"
    try:
        return Metrics(codec.device, perceptual=True, fid=False, protocol=protocol), "LPIPS/DISTS: VGG16"
    except (FileNotFoundError, OSError, RuntimeError) as err:
        return None, f"LPIPS/DISTS: not computed ({type(err).__name__}: {err})"


def _from_uint8(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]: the metrics round to 8 bits first, so this loses nothing."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
