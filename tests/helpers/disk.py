"""The test suite's own disk needs: where its temporary files go and whether there is room for them."""

from __future__ import annotations

import shutil
from pathlib import Path

#: free space under which a run warns (a run needs under 1 GB: passing tests' files are deleted, see
#: ``tmp_path_retention_policy`` in pyproject.toml)
LOW_DISK_GB = 2.0


def low_disk_warning(where: Path, low_gb: float = LOW_DISK_GB) -> str | None:
    """A one-line warning when ``where`` (or its nearest existing parent) has under ``low_gb`` GB free."""
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free / 1e9
    if free >= low_gb:
        return None
    return (
        f"WARNING: {free:.1f} GB free under {where}, where the tests write their temporary files (they need "
        "under 1 GB); tests may fail with 'No space left on device'"
    )
