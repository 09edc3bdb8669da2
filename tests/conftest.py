"""Shared fixtures: tiny models, real sample photos, an offline VGG16 stand-in, CI-aware skipping."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tadm.config.plugins import load_plugins
from tadm.testing.twins.vgg16_stand_in import write_random_vgg16
from tests.helpers import REPO, SAMPLES
from tests.helpers.disk import low_disk_warning

load_plugins()
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    torch.set_num_threads(1)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say so up front when the disk is nearly full: a full disk fails dozens of tests with OSError far
    from the cause (a CI run did, with other checkouts filling the disk it shared)."""
    warning = low_disk_warning(Path(session.config.option.basetemp or tempfile.gettempdir()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if warning and reporter is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        reporter.write_line(warning, yellow=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test: skipped when CI=true; run locally with `make test-all`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TORCH_HOME with a random VGG16 where torchvision looks for the ImageNet one (LPIPS / DISTS build
    offline, in this process and in the subprocesses it starts); no FID weights."""
    home = tmp_path_factory.mktemp("torch_home")
    write_random_vgg16(home)
    saved = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = saved


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
def small_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample validation photos cropped to 128 x 96: a recipe's one validation batch in a test checks that
    validation runs, and the full photos would only make its VAE decode ~1 s longer per test."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small_val")
    for photo in sorted((SAMPLES / "val").glob("*.png")):
        with Image.open(photo) as im:
            im.convert("RGB").crop((0, 0, 128, 96)).save(root / photo.name)
    assert len(list(root.iterdir())) >= 2
    return root


@pytest.fixture(scope="session")
def stage2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint after one stage-2 step of the tiny SD 2.1 config: trained tensors,
    optimiser state, tadm meta (shared by the export and codec tests)."""
    from tests.helpers.cli import build_cli, stage_args

    root = tmp_path_factory.mktemp("stage2")
    cli = build_cli(stage_args(root=root, extra=["--trainer.max_steps=1"]))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = root / "last.ckpt"
    cli.trainer.save_checkpoint(path)
    return path
