"""``tadm compare``: rows named by what differs, blanks for what a run did not compute, mixed protocols and
image sets refused (or flagged), plots drawn; and the facts ``tadm evaluate`` records for it (image-set
fingerprint, LR bits per pixel)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor

from tadm.commands.evaluate import bicubic_with_lr
from tadm.commands.main import main
from tadm.datamodules.inputs import EvalImage
from tadm.evaluation.engine import Metrics, evaluate, png_bits
from tadm.evaluation.protocols import get_protocol
from tadm.inference.pipeline import bicubic_round_trip
from tadm.studies.run_comparison import MixedRunsError, compare_runs, write_comparison

TADM = {"name": "tadm", "crop_border": 0, "description": "..."}
BASICSR = {"name": "basicsr", "crop_border": 16, "description": "..."}


def _method(name: str, psnr: float, **extra: Any) -> dict[str, Any]:
    values = {"lpips": None, "dists": None, "fid": None, "kid": None, "kid_std": None}
    return {"method": name, "images": 2, "psnr_y": psnr, "ssim_y": 0.5, "seconds": 0.25, **values, **extra}


def fake_run(
    root: Path,
    name: str,
    config: dict[str, Any] | None,
    psnr: float,
    protocol: dict[str, Any] = TADM,
    fingerprint: str | None = "f" * 64,
    notes: tuple[str, ...] = (),
    **extra: Any,
) -> Path:
    """A run folder as ``tadm fit`` + ``tadm evaluate --output RUN/eval`` leave it."""
    run = root / name
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    if config is not None:
        (ckpt.parent / "config.yaml").write_text(yaml.safe_dump(config))
    doc: dict[str, Any] = {
        "protocol": protocol,
        "color_fix": "none",
        "model": {"checkpoint": str(ckpt), "scale": 16, "trainable_parameters": 1_405_087},
        "methods": [
            _method(f"tadm last.ckpt [{name[:8]}]", psnr, **extra),
            _method("bicubic x16", 24.06, lr_bpp=0.08),
        ],
        "notes": ["Means over images.", *notes],
        "failed": [],
    }
    if fingerprint is not None:
        doc["image_set"] = {"images": 2, "unreadable": 0, "fingerprint": fingerprint}
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(doc))
    return run


#: aligner module -> class, as a dumped config names them
CLASSES = {"tpm": "TPM", "fixed": "FixedTimestep", "oracle": "OracleTimestep"}


def _config(aligner: str, t: float | None = None, lr: float = 1e-4) -> dict[str, Any]:
    spec: dict[str, Any] = {"class_path": f"tadm.components.aligners.{aligner}.{CLASSES[aligner]}"}
    if t is not None:
        spec["init_args"] = {"t": t}
    return {
        "trainer": {"max_steps": 10, "logger": {"init_args": {"name": aligner}}},
        "model": {"scale": 16, "aligner": spec, "optimizer": {"init_args": {"lr": lr}}},
    }


def _table(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def test_rows_are_named_by_what_differs_and_missing_metrics_are_blank(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "run_a", _config("tpm"), 25.5, lpips=0.41, lr_bpp=0.0803)
    b = fake_run(
        tmp_path, "run_b", _config("fixed", t=200.0), 24.9, notes=("LPIPS/DISTS not computed: off.",)
    )
    comparison = compare_runs([a, b])
    table = _table(comparison.markdown())
    # the logger name differs too, but it is not what the runs compare; a swapped class stands for its
    # arguments (t exists in one run only)
    names = ["aligner=TPM", "aligner=FixedTimestep", "bicubic x16 (reference)"]
    assert [r.name for r in comparison.rows] == names and list(table) == names
    first, second, ref = comparison.rows
    assert (first.psnr_y, first.lpips, first.lr_bpp, first.trainable_parameters) == (
        25.5,
        0.41,
        0.0803,
        1405087,
    )
    assert second.lpips is None and second.lr_bpp is None
    assert ref.reference and ref.trainable_parameters == 0 and ref.psnr_y == 24.06
    row_a, row_b = (table[n] for n in names[:2])
    assert row_a["PSNR-Y"] == "25.50" and row_a["LPIPS"] == "0.4100" and row_a["LR bpp"] == "0.0803"
    assert row_b["LPIPS"] == "" and row_b["DISTS"] == "" and row_b["FID"] == "" and row_b["LR bpp"] == ""
    assert row_a["trainable params"] == "1.41 M" and row_a["protocol"] == "tadm" and row_a["images"] == "2"
    assert "flag" not in row_a  # nothing mixed: no flag column
    assert "In the runs' reports: LPIPS/DISTS not computed: off." in comparison.markdown()  # why blank
    assert "Means over images." not in comparison.notes


def test_row_names_keep_only_the_differing_keys_shortened(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", _config("tpm", lr=1e-4), 25.0)
    b = fake_run(tmp_path, "b", _config("tpm", lr=3e-4), 25.1)
    assert [r.name for r in compare_runs([a, b]).rows[:2]] == ["lr=0.0001", "lr=0.0003"]
    c = fake_run(tmp_path, "c", None, 25.2)  # no config.yaml: folder names
    assert [r.name for r in compare_runs([a, c]).rows[:2]] == ["a", "c"]


def test_csv_holds_the_same_rows(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", _config("tpm", lr=1e-4), 25.0, lr_bpp=0.08)
    b = fake_run(tmp_path, "b", _config("tpm", lr=3e-4), 25.1)
    comparison = compare_runs([a, b])
    rows = list(csv.DictReader(io.StringIO(comparison.csv())))
    assert [r["name"] for r in rows] == ["lr=0.0001", "lr=0.0003", "bicubic x16 (reference)"]
    assert float(rows[0]["psnr_y"]) == 25.0 and rows[0]["lr_bpp"] == "0.08" and rows[1]["lr_bpp"] == ""
    assert rows[0]["trainable_parameters"] == "1405087" and rows[2]["reference"] == "True"


def test_mixed_protocols_are_refused_or_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = fake_run(tmp_path, "a", _config("tpm"), 25.0)
    b = fake_run(tmp_path, "b", _config("fixed"), 24.0, protocol=BASICSR)
    with pytest.raises(MixedRunsError, match="protocol tadm: .*protocol basicsr \\(crop 16\\)"):
        compare_runs([a, b])
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 2
    assert "do not compare" in capsys.readouterr().err and not out.exists()  # nothing written

    comparison = compare_runs([a, b], allow_mixed=True)
    table = _table(comparison.markdown())
    flags = {name: row["flag"] for name, row in table.items()}
    assert sorted(flags.values()) == ["", "", "other protocol", "other protocol"]  # b and its bicubic row
    assert "Mixed runs (--allow-mixed)" in comparison.markdown()


def test_mixed_or_unknown_image_sets_are_refused(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", _config("tpm"), 25.0)
    b = fake_run(tmp_path, "b", _config("fixed"), 24.0, fingerprint="0" * 64)
    with pytest.raises(MixedRunsError, match="image set"):
        compare_runs([a, b])
    c = fake_run(tmp_path, "c", _config("oracle"), 24.0, fingerprint=None)  # an older summary.json
    with pytest.raises(MixedRunsError, match="unknown"):
        compare_runs([a, c])
    flagged = compare_runs([a, c], allow_mixed=True)
    assert [r.flag for r in flagged.rows if not r.reference] == ["", "other image set"]


def test_a_study_folder_names_rows_by_cell_and_lists_cells_without_results(tmp_path: Path) -> None:
    study = tmp_path / "study"
    fake_run(study, "aligner=tpm", _config("tpm"), 25.0)
    fake_run(study, "aligner=fixed", _config("fixed"), 24.0)
    cells = [
        {"name": n, "values": {"aligner": n[8:]}, "directory": n, "summary": f"{n}/eval/summary.json", "status": s}
        for n, s in (("aligner=tpm", "done"), ("aligner=fixed", "done"), ("aligner=oracle", "failed"))
    ]  # fmt: skip
    cells[2]["detail"] = "fit exited 2 (log: ...)"
    (study / "study.json").write_text(json.dumps({"study": "s.yaml", "cells": cells}))
    comparison = compare_runs([study])
    assert [r.name for r in comparison.rows] == ["aligner=tpm", "aligner=fixed", "bicubic x16 (reference)"]
    assert "Not in the table: cell `aligner=oracle`" in comparison.markdown()
    assert "fit exited 2" in comparison.markdown()


def test_compare_command_writes_the_table_and_both_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path, "a", _config("tpm", lr=1e-4), 25.0, lpips=0.4, dists=0.2)
    b = fake_run(tmp_path, "b", _config("tpm", lr=3e-4), 25.1, lpips=0.3, dists=0.25)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() in printed and "| lr=0.0001 |" in printed
    for name in ("perception_distortion.png", "quality_time.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300


def test_without_matplotlib_the_table_is_written_and_the_note_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    a = fake_run(tmp_path, "a", _config("tpm", lr=1e-4), 25.0)
    b = fake_run(tmp_path, "b", _config("tpm", lr=3e-4), 25.1)
    written = write_comparison(compare_runs([a, b]), tmp_path / "out")
    assert sorted(p.name for p in written) == ["compare.csv", "compare.md"]
    assert "they need matplotlib" in (tmp_path / "out" / "compare.md").read_text()


def test_compare_refuses_folders_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "holds no summary.json" in capsys.readouterr().err


# ------------------------------------------------------------------------ what tadm evaluate records for it


def _photo(seed: int, h: int = 48, w: int = 64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


def _fingerprint(images: list[EvalImage]) -> str:
    report = evaluate(images, {"identity": lambda x: x}, Metrics(perceptual=False, fid=False))
    return str(report.image_set()["fingerprint"])


def test_image_set_fingerprint_ignores_paths_and_order_but_not_pixels() -> None:
    a, b = _photo(0), _photo(1)
    same = _fingerprint([EvalImage("x/a.png", a), EvalImage("x/b.png", b)])
    assert same == _fingerprint([EvalImage("/elsewhere/b.png", b), EvalImage("/elsewhere/a.png", a)])
    changed = b.clone()
    changed[0, 0, 0] += 2 / 255  # one pixel, one 8-bit level
    assert same != _fingerprint([EvalImage("x/a.png", a), EvalImage("x/b.png", changed)])
    assert same != _fingerprint([EvalImage("x/a.png", a)])


def test_lr_bpp_is_the_lr_png_size_per_hr_pixel_and_bicubic_keeps_its_lr() -> None:
    x = _photo(2, 64, 96)[None]
    recon, lr = bicubic_with_lr(x, 16)
    assert torch.equal(recon, bicubic_round_trip(x, 16)) and lr.shape == (1, 3, 4, 6)
    buf = io.BytesIO()
    u8 = ((lr[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(u8, mode="RGB").save(buf, format="PNG", compress_level=6)
    assert png_bits(lr) == 8 * len(buf.getvalue())
    metrics = Metrics(perceptual=False, fid=False, protocol=get_protocol("tadm", 16))
    report = evaluate(
        [EvalImage("a.png", x[0])],
        {"with lr": lambda t: bicubic_with_lr(t, 16), "plain": lambda t: t},
        metrics,
    )
    with_lr, plain = report.rows
    assert with_lr.lr_bpp == pytest.approx(png_bits(lr) / (64 * 96)) and plain.lr_bpp is None
    summary = json.loads(report.as_json())
    assert [m["lr_bpp"] for m in summary["methods"]] == [with_lr.lr_bpp, None]
    assert summary["image_set"]["images"] == 1 and len(summary["image_set"]["fingerprint"]) == 64
