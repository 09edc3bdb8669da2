"""What the ``tadm demo`` page shows of a result, as Markdown, HTML and picture files: the status line, the LR
file at its real size, the scores table, the timestep map's label, the magnified and compared pictures.

Apart from :mod:`tadm.demo.app` so that the page's content is plain functions of a result, without gradio
(which only :mod:`tadm.demo.app` imports).
"""

from __future__ import annotations

import base64
import html
import math
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tadm.demo.results import PhotoResult, Result, Scores

#: the page's style for the HTML made here (the LR file at its real size, the scores table) and the
#: magnified LR pictures: their pixels stay square
CSS = """
.tadm-lr-real img, #lr-magnified img, #lr-magnified-2 img { image-rendering: pixelated; }
.tadm-lr-real img {
  box-sizing: content-box; max-width: none; outline: 1px solid #888; vertical-align: middle; margin: 0 0.8em 0 0;
}
.tadm-scores { border-collapse: collapse; margin: 0.3em 0; }
.tadm-scores th, .tadm-scores td { padding: 0.25em 0.9em; border-bottom: 1px solid #ddd; text-align: right; }
.tadm-scores td:first-child, .tadm-scores th:first-child { text-align: left; }
"""


def error_md(err: BaseException) -> str:
    """A problem with the user's file (a ``TadmError``), as the status line."""
    return f"**Could not process it:** {_md(str(err))}"


def internal_error_md(err: BaseException) -> str:
    """A bug, as the status line; its traceback goes to the terminal, where a report can quote it."""
    traceback.print_exc()
    return (
        f"**Internal error** ({type(err).__name__}: {_md(str(err))}). This is a bug in tadm, not your file; "
        "the details are in the terminal running `tadm demo`. The page is ready for the next one."
    )


def _md(text: str) -> str:
    """A message as Markdown text: its own lines joined, HTML escaped (file names are the user's)."""
    return html.escape(" ".join(text.split()), quote=False)


def done_md(name: str, hr_size: tuple[int, int], seconds: dict[str, float], notes: Sequence[str]) -> str:
    """The status line of a finished job: its size, times, and each note on how the file was read."""
    h, w = hr_size
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
    lines = [f"**Done:** {_md(name)}, {w}x{h} px, in {sum(seconds.values()):.2f} s ({parts})."]
    lines += [f"- {_md(note)}" for note in notes]
    return "\n".join(lines)


def lr_html(lr_file: Path, lr_size: tuple[int, int], hr_size: tuple[int, int]) -> str:
    """The LR file itself at its real size (the PNG's own bytes, inline) and what it costs."""
    data = lr_file.read_bytes()
    (h, w), (hh, hw) = lr_size, hr_size
    bpp = 8 * len(data) / (hh * hw)
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return (
        f'<div class="tadm-lr-real"><img id="lr-real-img" src="{src}" width="{w}" height="{h}" '
        f'alt="the LR file at its real size"><span id="lr-facts" data-lr-width="{w}" data-lr-height="{h}" '
        f'data-bytes="{len(data)}">LR file: <b>{w}x{h} px</b> ({w * h:,} pixels), <b>{len(data):,} bytes</b> '
        f"= <b>{bpp:.3f} bits per pixel</b> of the {hw}x{hh} original (24 uncompressed; "
        f"{24 / bpp:.0f}x smaller), shown at its real size</span></div>"
    )


def scores_html(scores: dict[str, Scores] | None, pending: str | None) -> str:
    """PSNR-Y / SSIM-Y / LPIPS / DISTS of both methods; each cell carries its exact value (``data-value``)."""

    def cell(method: str, metric: str, value: float | None, digits: int) -> str:
        if value is None or math.isnan(value):
            shown = "n/a" if value is None else "..."
            return f'<td data-method="{method}" data-metric="{metric}">{shown}</td>'
        return f'<td data-method="{method}" data-metric="{metric}" data-value="{value!r}">{value:.{digits}f}</td>'

    rows = []
    for method, label in (("restored", "tadm (restored)"), ("bicubic", "bicubic down + up")):
        s = (scores or {}).get(method) or Scores(math.nan, math.nan)
        rows.append(
            f"<tr><td>{label}</td>{cell(method, 'psnr_y', s.psnr_y, 2)}{cell(method, 'ssim_y', s.ssim_y, 4)}"
            f"{cell(method, 'lpips', s.lpips, 4)}{cell(method, 'dists', s.dists, 4)}</tr>"
        )
    note = f'<div class="tadm-note">{html.escape(pending)}</div>' if pending else ""
    return (
        '<table class="tadm-scores"><tr><th>against the original</th><th>PSNR-Y (dB)</th><th>SSIM-Y</th>'
        f"<th>LPIPS</th><th>DISTS</th></tr>{''.join(rows)}</table>{note}"
    )


def timestep_label(result: Result) -> str:
    """The timestep map's caption: the range of t the aligner chose, within its own range."""
    if result.timestep_range is None or result.aligner_range is None:
        return "Timestep map the aligner chose"
    (lo, hi), (a, b) = result.timestep_range, result.aligner_range
    return f"Timestep map the aligner chose: t from {lo:.0f} to {hi:.0f} (its range {a:g}-{b:g}; viridis)"


def heat_file(result: Result) -> str | None:
    """The timestep map's file to show (None: no enhancer)."""
    return None if result.timesteps_file is None else str(result.timesteps_file)


def nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` magnified ``factor`` times by nearest neighbour, so each LR pixel shows as a square."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def save_view(path: Path, image: np.ndarray) -> str:
    """A picture only shown (fast PNG); the files offered for download are the codec's own."""
    Image.fromarray(image).save(path, format="PNG", compress_level=1)
    return str(path)


def load_view(path: str) -> np.ndarray:
    """A shown picture back as (H, W, 3) uint8: the later scores read the result from disk, not memory."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_views(result: PhotoResult, scale: int) -> dict[str, str]:
    """The pictures of a round trip as files beside its result (the page and the slider show files)."""
    folder = result.lr_file.parent
    views = {
        "original": save_view(folder / "original.view.png", result.original),
        "restored": str(result.restored_file),
        "bicubic": save_view(folder / "bicubic.view.png", result.bicubic),
        "lr": save_view(folder / "lr.view.png", nearest(result.lr, scale)),
    }
    if result.timesteps_file is not None:
        views["timesteps"] = str(result.timesteps_file)
    return views
