"""Runs a benchmark's cases each in a fresh Python process, so a case's peak RSS and its failure are its own.

A benchmark script answers ``--case NAME`` by printing one line ``RESULT <json>`` (:func:`report`); its main
loop calls :func:`run_case` per case and prints what came back, or why nothing did.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

PREFIX = "RESULT "


def report(result: dict[str, Any]) -> None:
    """What a case prints for :func:`run_case` to read."""
    print(PREFIX + json.dumps(result), flush=True)


def run_case(
    script: str, case: str, timeout: float, args: Sequence[str] = ()
) -> tuple[dict[str, Any] | None, str]:
    """``python SCRIPT --case CASE [ARGS]``: its result, or None and why (timed out, killed, its last error
    line)."""
    try:
        proc = subprocess.run(
            [sys.executable, script, "--case", case, *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)), None)
    if line is not None:
        return json.loads(line[len(PREFIX) :]), ""
    if proc.returncode < 0:
        return None, f"failed: rc={proc.returncode} killed (out of memory?)"
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None, f"failed: rc={proc.returncode} {last}"
