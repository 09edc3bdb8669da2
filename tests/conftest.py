"""Shared fixtures: tiny models, real sample photos, CI-aware skipping of slow tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tadm.registry import load_plugins

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "assets" / "samples"

load_plugins()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test: skipped when CI=true; run locally with `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and leave the other core to whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def stage2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint after one stage-2 step of the tiny SD 2.1 config: trained tensors,
    optimiser state, tadm meta (shared by the export and codec tests)."""
    from tests.test_checkpoint_io import _args
    from tests.test_stages import _cli

    root = tmp_path_factory.mktemp("stage2")
    cli = _cli(_args(root, extra=["--trainer.max_steps=1"]))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = root / "last.ckpt"
    cli.trainer.save_checkpoint(path)
    return path
