"""What ``make test-browser`` needs, installed when missing: the ``demo`` extra (gradio) and Playwright's
Python package into this interpreter's environment, and Debian's ``chromium`` (Playwright drives the system
browser; no browser download).

Python packages are added, never changed: gradio 6 declares ``pillow<13``, and a plain
``pip install '.[demo]'`` would downgrade the Pillow every other test runs with. So pip resolves the set
first (``--dry-run --report``), and only the packages that are not installed at all are installed, at the
versions it chose, with ``--no-deps``; each installed package it wanted to change is named in one line.

    python tests/demo/browser_setup.py      # exit 0: ready; 2: something is missing and cannot be installed
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: besides the demo extra: the test's browser driver (it talks to the system chromium)
TEST_REQUIREMENTS = ("playwright>=1.45,<2",)
APT_PACKAGE = "chromium"


class Missing(Exception):
    """Something the browser test needs is absent and cannot be installed here; the message says what to do."""


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_packages() -> None:
    """Install what the demo extra and the test need and this environment lacks; change nothing installed."""
    if _installed("gradio") and _installed("playwright"):
        return
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--quiet", "--report", str(report), "-e", f"{REPO}[demo]"]
        subprocess.run([*cmd, *TEST_REQUIREMENTS], check=True)
        wanted = json.loads(report.read_text())["install"]
    add, kept = [], []
    for item in wanted:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower() == "tadm":
            continue
        have = _installed(name)
        if have is None:
            add.append(f"{name}=={version}")
        elif have != version:
            kept.append(f"{name} {have} (pip would install {version})")
    for line in kept:
        print(f"browser_setup: keeping {line}: the installed version serves the rest of the suite")
    if add:
        print(f"browser_setup: pip install --no-deps {' '.join(add)}")
        subprocess.run([*pip, "install", "--quiet", "--no-deps", *add], check=True)


def chromium() -> None:
    """Debian's chromium, from apt when it is missing and we may install it (root, apt-get present)."""
    if shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Missing(
            "the browser test needs Debian's `chromium` on PATH; install it as root with "
            "`apt-get update && apt-get install -y chromium` (this user cannot)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", APT_PACKAGE], check=True, env=env)
    if not shutil.which("chromium"):
        raise Missing(f"apt installed {APT_PACKAGE} but `chromium` is still not on PATH")


def main() -> int:
    try:
        python_packages()
        chromium()
    except subprocess.CalledProcessError as err:
        print(
            f"browser_setup: `{' '.join(map(str, err.cmd))}` failed (exit {err.returncode})", file=sys.stderr
        )
        return 2
    except Missing as err:
        print(f"browser_setup: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
