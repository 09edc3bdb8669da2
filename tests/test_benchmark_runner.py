"""benchmarks/case_runner.py, which runs each case of the full-size benchmarks in its own process: a case's
result, or why there is none (its last error line, a kill, a timeout) and the next case goes on; and the GPU
script's CPU side (benchmarks/gpu_all.sh, gpu_training.py, upscale.py) on tiny twins, before GPU time is spent."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import REPO, load_script

CASES = """
import os, signal, sys, time
sys.path.insert(0, {bench!r})
from case_runner import report

case = sys.argv[2]
if case == "ok":
    print("loading ...")
    report({{"case": case, "seconds": 1.5}})
elif case == "error":
    raise RuntimeError("no such model")
elif case == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
else:
    time.sleep(60)
"""


def _runner() -> ModuleType:
    return load_script(REPO / "benchmarks" / "case_runner.py")


def test_a_case_gives_its_result_or_says_why_not(tmp_path: Path) -> None:
    run_case = _runner().run_case
    script = tmp_path / "bench.py"
    script.write_text(CASES.format(bench=str(REPO / "benchmarks")))
    assert run_case(str(script), "ok", 60) == ({"case": "ok", "seconds": 1.5}, "")
    result, why = run_case(str(script), "error", 60)
    assert result is None and why == "failed: rc=1 RuntimeError: no such model"
    result, why = run_case(str(script), "killed", 60)
    assert result is None and why == "failed: rc=-9 killed (out of memory?)"
    result, why = run_case(str(script), "slow", 2)
    assert result is None and why == "timed out after 2 s"


def _bench(name: str) -> ModuleType:
    return load_script(REPO / "benchmarks" / f"{name}.py", f"bench_{name}")


@pytest.mark.slow  # ~11 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_the_gpu_training_steps_run_their_cpu_side_on_a_tiny_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_training.py's stage-2 case as the GPU script runs it (the recipe + one_gpu_24gb.yaml through tadm's
    CLI, micro-steps, the non-finite check, clipping, the optimiser step), on the tiny SD 2.1 twin on the CPU:
    a typo fails here, not after minutes of GPU time."""
    bench = _bench("gpu_training")
    monkeypatch.chdir(REPO)
    args = argparse.Namespace(device="cpu", tiny=True, micro_steps=1)
    row = bench.measure("stage2-sd21", args)
    assert row["accumulate"] == 8 and row["micro_batch"] == 2 and row["gradient_checkpointing"]
    assert row["optimizer"] == "torch.optim.adamw.AdamW" and row["finite_steps"] == row["steps"] == 2
    assert row["step_s"] == pytest.approx(8 * row["micro_step_s"] + row["optimizer_step_s"])
    table = bench.markdown([row], {"stage2-sd21-8bit": "skipped: bitsandbytes is not installed"})
    assert "| stage2-sd21 | 2 x 64, 8 |" in table and "(11.37)" in table and "skipped: bitsandbytes" in table


@pytest.mark.slow  # ~15 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_the_gpu_upscale_benchmark_runs_its_cpu_side_on_a_tiny_twin() -> None:
    """upscale.py's cases (throughput, the timed breakdown, a batch of 3) on the tiny SD 2.1 twin: the
    statistics pass is timed on a multi-tile image (9 VAE tiles, each decoded twice) and absent on a
    single-tile one."""
    bench = _bench("upscale")
    args = argparse.Namespace(
        repeats=2,
        seconds_per_case=1.0,
        breakdown_all=False,
        sync_count=True,
        op_counts=True,
        precision="fp32",
    )
    codec = bench.build_tiny_codec("sd21-base", "cpu", "fp32", 4, False, False)
    timers = bench.part_timers(codec, torch.device("cpu"))
    rows = {}
    for (h, w), batch in (((128, 128), 1), ((256, 256), 1), ((128, 128), 3)):
        y = torch.rand(batch, 3, h // 16, w // 16) * 2 - 1
        rows[h, batch] = bench.one_case(args, codec, timers, y, (h, w), torch.device("cpu"))
    one, tiled, batched = rows[128, 1], rows[256, 1], rows[128, 3]
    assert one["repeats"] == 2 and one["decoder_calls"] == 1 and one["gn_stats_s"] == 0.0
    assert tiled["decoder_calls"] == 18 and tiled["gn_stats_s"] > 0 and tiled["unet_calls"] == 3
    assert tiled["repeats"] == 1  # a call of over a second: --seconds-per-case 1 stops after one
    assert "unet_s" not in batched and batched["images_per_s"] > 0 and batched["seconds_per_image"] > 0
    # aten ops per part (the launches an eager GPU pays one by one): every part counted, the decoder twice
    # per tile when the statistics are synchronised
    ops, single = tiled["aten_ops"], one["aten_ops"]
    assert set(ops) == set(single) == {"unet", "decoder", "dfrm", "aligner", "enhancer", "rest"}
    assert ops["decoder"] > 9 * single["decoder"]  # 9 VAE tiles
    assert ops["unet"] >= 3 * single["unet"]  # 3 UNet calls
    assert "aten_ops" not in batched
    rest = sum(single.values()) - single["unet"] - single["decoder"]
    row = one | {"preset": "sd21-base", "size": "128x128", "batch": 1, "mode": "eager"}
    assert f"| {single['unet']} / {single['decoder']} / {rest} |" in bench.table([row])


@pytest.mark.slow  # ~7 minutes on a 2-core CPU (the compile step: about a minute of inductor)
def test_the_gpu_script_dry_run_writes_every_file(tmp_path: Path) -> None:
    """``bash benchmarks/gpu_all.sh --dry-run``: every step of the GPU script on tiny twins on the CPU, and
    the eight files the GPU run brings back."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_all.sh"), "--dry-run"], env=env, timeout=1200
    )
    assert done.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_all.log", "gpu_compile.json", "gpu_compile.md", "gpu_inference.json", "gpu_inference.md",
        "gpu_profile.txt", "gpu_training.json", "gpu_training.md",
    ]  # fmt: skip
    training = json.loads((tmp_path / "gpu_training.json").read_text())
    assert [r["case"] for r in training["rows"]] == [
        "stage1-sd21",
        "stage2-sd21",
        "stage3-sd21",
        "stage2-sdxl",
    ]
    inference = json.loads((tmp_path / "gpu_inference.json").read_text())
    assert {(r["preset"], r["batch"]) for r in inference} == {
        (p, b) for p in ("sd21-base", "sdxl") for b in (1, 8)
    }
