"""What ``tadm evaluate`` reports: per-image rows, failures, FID and KID per method, the protocol and notes,
written as ``per_image.csv``, ``summary.md`` and ``summary.json`` (each atomically)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tadm.errors import OutputWriteError
from tadm.evaluation.protocols import Protocol, TadmProtocol
from tadm.ops.files import DestinationExists, atomic_write_text

CSV_COLUMNS = ("path", "height", "width", "method", "psnr_y", "ssim_y", "lpips", "dists", "seconds")
CSV_COLUMNS += ("protocol", "color_fix")  # last, so the columns before them keep their places
CSV_COLUMNS += ("lr_bpp",)
TABLE_HEADER = ("method", "images", "PSNR-Y", "SSIM-Y", "LPIPS", "DISTS", "FID", "KID", "s/image")
REPORT_FILES = ("per_image.csv", "summary.md", "summary.json")


def existing_report_file(output_dir: str | os.PathLike[str]) -> Path | None:
    """The first report file already in ``output_dir`` (None: none): ``tadm evaluate`` refuses to replace
    it without ``--overwrite``."""
    out = Path(output_dir)
    return next((out / name for name in REPORT_FILES if os.path.lexists(out / name)), None)


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
    lr_bpp: float | None = None
    """Bits of the method's 8-bit LR image as a PNG (compress level 6, no text chunks) per HR pixel; None
    when the method does not hand its LR image to the engine."""


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
    kid: float | None
    kid_std: float | None
    seconds: float | None
    lr_bpp: float | None = None


@dataclass
class EvalReport:
    """Everything ``tadm evaluate`` reports: per-image rows, failures, FID and KID per method, the protocol
    PSNR-Y / SSIM-Y were computed with, the colour correction of the reconstructions, and notes."""

    methods: list[str]
    rows: list[ImageRow] = field(default_factory=list)
    errors: list[EvalError] = field(default_factory=list)
    fid: dict[str, float | None] = field(default_factory=dict)
    kid: dict[str, float | None] = field(default_factory=dict)
    kid_std: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    protocol: Protocol = field(default_factory=TadmProtocol)
    color_fix: str = "none"
    """The colour correction of the reconstructions (``tadm evaluate --color-fix``)."""
    image_digests: dict[str, str] = field(default_factory=dict)
    """Input path -> SHA-256 of its 8-bit pixels and size, for every image that was read: ``summary.json``
    records the set's fingerprint so that ``tadm compare`` never mixes runs on different images."""
    model: dict[str, object] = field(default_factory=dict)
    """What was evaluated (checkpoint, ids, stage, trainable parameters), as the command knows it."""

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
                    self.kid.get(method),
                    self.kid_std.get(method),
                    _mean([r.seconds for r in rows]),
                    _mean([r.lr_bpp for r in rows]),
                )
            )
        return out

    def markdown(self) -> str:
        """The protocol, the summary table (means over images) and a line per failure or metric not computed."""
        lines = [
            f"Protocol: `{self.protocol.name}` (`tadm evaluate --protocol {self.protocol.name}`)",
            f"Colour correction: `{self.color_fix}` (`tadm evaluate --color-fix {self.color_fix}`)",
            "",
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
                _fmt(s.kid, 4),
                _fmt(s.seconds, 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *self.note_lines()]
        unreadable = [e for e in self.errors if e.method is None]
        failed = [e for e in self.errors if e.method is not None]
        if unreadable:
            lines.append(f"Failed: {len(unreadable)} input(s) could not be read and are not in the table:")
            lines += [f"- `{e.path}`: {e.reason}" for e in unreadable]
        if failed:
            lines.append(f"Failed: {len(failed)} image/method pair(s) could not be scored:")
            lines += [f"- `{e.path}` with `{e.method}`: {e.reason}" for e in failed]
        return "\n".join(lines) + "\n"

    def note_lines(self) -> list[str]:
        """The lines under the table: what the numbers are (the protocol first), caveats, metrics not computed."""
        lines = [
            "Means over images. " + self.protocol.describe(),
            "LPIPS: VGG; FID and KID: Inception features (torchmetrics / torch-fidelity) of the sets of full HR "
            "and reconstructed images; s/image: wall clock of the method's round trip.",
            *self.protocol.caveats(),
        ]
        if self.color_fix != "none":
            how = {
                "wavelet": "its low frequencies (5 dilated 3x3 blurs) replaced by those of",
                "adain": "its per-channel mean and std matched to those of",
            }[self.color_fix]
            lines.append(
                f"Colour correction `{self.color_fix}`: each reconstruction has {how} the bicubic upscale of "
                "its LR image, once on the whole image (the bicubic row is its own reference: unchanged)."
            )
        for method in self.methods:
            n_inf = sum(1 for r in self.rows if r.method == method and math.isinf(r.psnr_y))
            if n_inf:
                lines.append(
                    f"PSNR-Y of `{method}` is inf on {n_inf} image(s) (identical to the HR image after 8-bit "
                    "rounding), so its mean is inf; per-image values are in per_image.csv."
                )
        return lines + self.notes

    def as_json(self) -> str:
        """``summary.json``: the protocol, the means per method (inf / nan as the strings "inf" / "nan"), the
        notes and the failures (``method`` null: the input could not be read)."""
        doc = {
            "protocol": self.protocol.as_dict(),
            "color_fix": self.color_fix,
            "image_set": self.image_set(),
            "model": self.model,
            "methods": [{k: _json_value(v) for k, v in asdict(s).items()} for s in self.summary()],
            "notes": self.note_lines(),
            "failed": [asdict(e) for e in self.errors],
        }
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"

    def image_set(self) -> dict[str, object]:
        """The identity of the evaluated images, independent of their paths and order: their count and the
        SHA-256 of their sorted pixel digests (``tadm compare`` refuses runs whose fingerprints differ)."""
        digests = sorted(self.image_digests.values())
        fingerprint = hashlib.sha256("\n".join(digests).encode()).hexdigest()
        unreadable = sum(1 for e in self.errors if e.method is None)
        return {"images": len(digests), "unreadable": unreadable, "fingerprint": fingerprint}

    def write(self, output_dir: str | os.PathLike[str], overwrite: bool = True) -> str:
        """Write ``per_image.csv``, ``summary.md`` and ``summary.json`` (each atomically) to ``output_dir``;
        return the Markdown. ``overwrite=False`` never replaces a report file, even one another run wrote
        after the command checked (:class:`~tadm.ops.files.DestinationExists`). A file that cannot be
        written is an :class:`~tadm.errors.OutputWriteError` naming it."""
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputWriteError.of(out, err) from err
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in self.rows:
            writer.writerow(
                [r.path, r.height, r.width, r.method]
                + [_csv_float(v) for v in (r.psnr_y, r.ssim_y, r.lpips, r.dists, r.seconds)]
                + [self.protocol.name, self.color_fix, _csv_float(r.lr_bpp)]
            )
        text = self.markdown()
        for name, content in zip(REPORT_FILES, (buf.getvalue(), text, self.as_json()), strict=True):
            try:
                atomic_write_text(out / name, content, overwrite=overwrite)
            except DestinationExists:
                raise
            except OSError as err:  # a full disk: name the file (its temp file is already gone)
                raise OutputWriteError.of(out / name, err) from err
        return text


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


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan": JSON has no such numbers
    return value


def _csv_float(value: float | None) -> str:
    return "" if value is None else repr(float(value))  # repr: exact round trip; inf -> "inf"
