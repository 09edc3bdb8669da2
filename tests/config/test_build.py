"""tadm.config.build: which backbones ``--backbone FOLDER`` (``pretrained``) applies to."""

from __future__ import annotations

import pytest

from tadm.config.build import takes_argument
from tadm.config.plugins import load_plugins
from tadm.contracts import BACKBONES


@pytest.mark.parametrize(
    ("name", "takes"),
    [("stable_diffusion", True), ("sd3", True), ("flux", True), ("space_to_depth", False)],
)
def test_pretrained_is_found_through_kwargs_passed_to_the_base(name: str, takes: bool) -> None:
    """The SD 3 / FLUX backbones take ``pretrained`` through ``**kwargs`` (one argument list for every
    diffusers backbone): ``inspect.signature`` of their own ``__init__`` alone missed it, and ``tadm upscale
    --backbone`` refused their checkpoints as backbones that load no weights."""
    load_plugins()
    assert takes_argument(BACKBONES.get(name), "pretrained") is takes
    assert takes_argument(BACKBONES.get(name), "no_such_argument") is False
