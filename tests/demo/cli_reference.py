"""What the commands make of a photo, to hold the demo to: the LR file ``tadm downscale`` writes and the
per-image scores ``tadm evaluate`` reports (both run in-process through ``tadm``'s entry point)."""

from __future__ import annotations

import csv
from pathlib import Path

from tadm.commands.main import main


def downscaled_file(ckpt: str | Path, photo: Path, out: Path, *options: str) -> Path:
    """``tadm downscale --ckpt CKPT PHOTO --output OUT``: the LR file it wrote."""
    assert (
        main(["downscale", "--ckpt", str(ckpt), str(photo), "--output", str(out), "--no-progress", *options])
        == 0
    )
    return out / f"{photo.stem}.png"


def evaluated_rows(ckpt: str | Path, photo: Path, out: Path, *options: str) -> dict[str, dict[str, str]]:
    """``tadm evaluate --ckpt CKPT PHOTO --output OUT --no-fid``: per_image.csv's rows, as
    ``{"restored": row, "bicubic": row}`` (the checkpoint's and the bicubic reference's)."""
    argv = [
        "evaluate",
        "--ckpt",
        str(ckpt),
        str(photo),
        "--output",
        str(out),
        "--no-fid",
        "--no-progress",
        *options,
    ]
    assert main(argv) == 0
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, rows
    return {("bicubic" if row["method"].startswith("bicubic") else "restored"): row for row in rows}
