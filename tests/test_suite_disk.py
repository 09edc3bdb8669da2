"""The suite's own disk use: a passing test's temporary files are deleted, and a nearly full disk is
announced before the tests fail with OSError far from the cause (a CI run sharing a full disk did)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.disk import low_disk_warning


def test_a_passing_tests_temporary_files_are_deleted(request: pytest.FixtureRequest) -> None:
    """The suite writes GBs of checkpoints and saved models into tmp_path; pytest's default keeps every
    test's for 3 sessions."""
    assert request.config.getini("tmp_path_retention_policy") == "failed"


def test_a_nearly_full_disk_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage

    def free(gb: float) -> Any:
        return lambda path: real(path)._replace(free=int(gb * 1e9))

    monkeypatch.setattr(shutil, "disk_usage", free(0.4))
    text = low_disk_warning(tmp_path / "not" / "made" / "yet")
    assert text is not None and f"0.4 GB free under {tmp_path}," in text and "No space left" in text
    monkeypatch.setattr(shutil, "disk_usage", free(5.0))
    assert low_disk_warning(tmp_path) is None
