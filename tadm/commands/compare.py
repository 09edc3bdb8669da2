"""``tadm compare RUN...``: several ``tadm evaluate`` reports as one table (Markdown + CSV) and two plots.

    tadm compare runs/studies/demo                       # a `tadm study` folder: one row per cell
    tadm compare reports/a reports/b --output reports/ab  # `tadm evaluate --output` folders

Rows are named by what differs between the runs; runs scored under different protocols or on different
images are refused (``--allow-mixed`` shows them flagged instead). The logic:
:mod:`tadm.studies.run_comparison`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tadm.commands.common import EXIT_OK, command


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tadm compare", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="`tadm evaluate --output` folders (or their summary.json), or `tadm study` output folders",
    )
    ap.add_argument(
        "--output",
        "-o",
        type=Path,
        help="folder for compare.md, compare.csv and the plots (default: the study folder when given one, "
        "else ./comparison)",
    )
    ap.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare runs of different protocols or image sets anyway, each such row flagged",
    )
    return ap


@command("tadm compare")
def compare_command(argv: Sequence[str]) -> int:
    """Compare evaluated runs: one table and the perception-distortion and quality-vs-time plots."""
    args = _parser().parse_args(list(argv))
    from tadm.studies.run_comparison import compare_runs, write_comparison
    from tadm.studies.study_plan import MANIFEST

    comparison = compare_runs(args.runs, allow_mixed=args.allow_mixed)
    output = args.output
    if output is None:
        one_study = len(args.runs) == 1 and (args.runs[0] / MANIFEST).is_file()
        output = args.runs[0] if one_study else Path("comparison")
    written = write_comparison(comparison, output)
    print(comparison.markdown())
    print(f"wrote {', '.join(p.name for p in written)} to {output}", file=sys.stderr)
    return EXIT_OK
