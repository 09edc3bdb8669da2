"""Start-up time of the ``tadm`` command (issue 15): ``import torch``, ``tadm --help``, ``tadm list`` and a
codec call, each in fresh processes, side by side with their ratio to ``import torch`` from the same run.

    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/startup.py                 # 5 rounds, ~2-3 min
    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/startup.py --importtime    # + where the time goes
    git worktree add --detach /tmp/tadm-before <commit>       # then, in the same run, that checkout too:
    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/startup.py --baseline /tmp/tadm-before

Every round runs each case once, in this order, as a new process (so the rounds interleave and a slow
spell of the machine hits every case alike); the table gives the median and the minimum per case:

- ``import torch``: ``python -c "import torch"``, the floor every tadm command pays;
- ``tadm --help``, ``tadm list`` and ``tadm evaluate --help``: the console script next to this Python;
- ``codec start``: ``load_codec`` of the shipped quickstart model (``assets/models/quickstart_x16.safetensors``,
  the embedded ``space_to_depth`` backbone) in a fresh process and nothing else: what a codec call pays
  before its first image;
- ``tadm downscale`` (4 MP): the whole command on one 2304x1728 photo (the bundled ``astronaut.png``
  resized, written once into a temporary folder), on ``--threads`` torch threads.

``--baseline DIR`` also runs every tadm case against another checkout's ``tadm`` (its folder first on
``PYTHONPATH``, and its own folder as the working directory), in the same rounds: before and after a
change, measured side by side against the same ``import torch``.

``--importtime`` adds, for help, list and codec start, one ``python -X importtime`` run each and prints
the packages that cost the most (self time summed per top-level package), and which of lightning,
diffusers, transformers, peft, torchvision, torchmetrics and scipy each one imports. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "assets" / "models" / "quickstart_x16.safetensors"
PHOTO_SOURCE = ROOT / "assets" / "samples" / "train" / "astronaut.png"
PHOTO_SIZE = (2304, 1728)  # 3.98 MP
#: packages a start-up should not pay for unless it needs them
HEAVY = ("lightning", "diffusers", "transformers", "peft", "torchvision", "torchmetrics", "scipy")


def tadm_command() -> list[str]:
    """The installed console script next to this interpreter (what a user runs), else ``python -m tadm``."""
    script = Path(sys.executable).with_name("tadm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tadm"]


def make_photo(folder: Path) -> Path:
    """A 4 MP photo (the bundled astronaut, resized with Lanczos), written once."""
    from PIL import Image

    path = folder / "photo_4mp.png"
    with Image.open(PHOTO_SOURCE) as img:
        img.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.LANCZOS).save(path)
    return path


def cases(work: Path, photo: Path) -> dict[str, list[str]]:
    tadm = tadm_command()
    load = f"from tadm.model.loading import load_codec; load_codec({str(QUICKSTART)!r})"
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "tadm --help": [*tadm, "--help"],
        "tadm list": [*tadm, "list"],
        "tadm evaluate --help": [*tadm, "evaluate", "--help"],
        "codec start": [sys.executable, "-c", load],
        "tadm downscale (4 MP)": [
            *tadm,
            "downscale",
            "--ckpt",
            str(QUICKSTART),
            str(photo),
            "--output",
            str(work / "lr"),
            "--overwrite",
            "--no-progress",
        ],
    }


def run_once(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def import_profile(argv: list[str], env: dict[str, str], top: int) -> None:
    """One ``-X importtime`` run: self time per top-level package, and the heavy packages it imported."""
    if argv[0] != sys.executable:  # the console script: run its entry point under this interpreter
        argv = [
            sys.executable,
            "-c",
            "import sys; from tadm.commands.main import main; sys.exit(main())",
            *argv[1:],
        ]
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True
    )
    per_package: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():  # the header, or a line of the command
            continue
        per_package[fields[2].strip().split(".")[0]] += int(fields[0]) / 1e6
    total = sum(per_package.values())
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    heavy = [name for name in HEAVY if name in per_package]
    print(f"  imports {total:.2f} s in all; heavy packages imported: {', '.join(heavy) or 'none'}")
    print("  " + ", ".join(f"{name} {sec:.2f}" for name, sec in ranked))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="fresh processes per case (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument(
        "--skip", nargs="*", default=[], help="case names to leave out, e.g. 'tadm downscale (4 MP)'"
    )
    ap.add_argument("--importtime", action="store_true", help="also show where the import time goes")
    ap.add_argument("--top", type=int, default=8, help="packages shown per --importtime profile")
    ap.add_argument("--baseline", type=Path, help="another checkout whose tadm is timed alongside")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="tadm-startup-") as tmp:
        work = Path(tmp)
        todo = {k: v for k, v in cases(work, make_photo(work)).items() if k not in args.skip}
        #: name -> (argv, env, working directory)
        runs = {name: (argv, env, ROOT) for name, argv in todo.items()}
        if args.baseline is not None:
            base_dir = args.baseline.resolve()
            base_env = {**env, "PYTHONPATH": os.pathsep.join([str(base_dir), env.get("PYTHONPATH", "")])}
            for name, argv in todo.items():
                if name != "import torch":
                    runs[f"{name}, baseline"] = (argv, base_env, base_dir)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for argv, run_env, cwd in runs.values():  # warm the file cache once; not counted
            run_once(argv, run_env, cwd)
        for _ in range(args.rounds):
            for name, (argv, run_env, cwd) in runs.items():
                times[name].append(run_once(argv, run_env, cwd))

        print(
            f"{platform.node()} | {os.cpu_count()} CPUs | Python {platform.python_version()} | "
            f"OMP_NUM_THREADS={args.threads} | {args.rounds} rounds, fresh process each"
            + (f" | baseline: {args.baseline}" if args.baseline else "")
        )
        base = statistics.median(times["import torch"]) if "import torch" in times else None
        print("| case | median s | min s | median / import torch |\n|---|---|---|---|")
        for name, values in times.items():
            med = statistics.median(values)
            ratio = f"{med / base:.2f}x" if base else "n/a"
            print(f"| {name} | {med:.2f} | {min(values):.2f} | {ratio} |")

        if args.importtime:
            for name in ("tadm --help", "tadm list", "codec start"):
                if name in todo:
                    print(f"\n-X importtime, {name} (self time per top-level package, s):")
                    import_profile(todo[name], env, args.top)


if __name__ == "__main__":
    main()
