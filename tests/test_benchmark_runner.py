"""benchmarks/case_runner.py, which runs each case of the full-size benchmarks in its own process: a case's
result, or why there is none (its last error line, a kill, a timeout) and the next case goes on."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from tests.helpers import REPO

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
    spec = importlib.util.spec_from_file_location("case_runner", REPO / "benchmarks" / "case_runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
