"""LPIPS/DISTS loss: values behave, gradients flow, and offline without VGG weights the error names the file."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tadm.evaluation import perceptual
from tadm.evaluation.perceptual import VGG16_FILE, PerceptualLoss


def test_missing_vgg_weights_error_names_file_and_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with pytest.raises(FileNotFoundError) as info:
        PerceptualLoss(lpips_weight=5.0, dists_weight=0.0)
    msg = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in msg


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def test_losses_are_zero_on_identity_and_differentiable() -> None:
    loss = PerceptualLoss()  # on the random VGG16 stand-in conftest puts in TORCH_HOME
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    same = loss(x, x)
    assert set(same) == {"lpips", "dists"}
    assert all(abs(v.item()) < 1e-5 for v in same.values())
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    terms = loss(y, x)
    assert all(v.item() > 1e-4 for v in terms.values())
    sum(terms.values()).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_zero_weight_skips_the_network() -> None:
    loss = PerceptualLoss(lpips_weight=0.0, dists_weight=5.0)
    assert loss.lpips is None and set(loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))) == {"dists"}


def test_networks_built_without_random_draws_equal_normally_built_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Skipping the draws is only right if every parameter and buffer is then loaded: compare with a build
    that draws them (uninitialised memory left anywhere would differ)."""
    fast = PerceptualLoss()
    monkeypatch.setattr(perceptual, "weights_loaded_later", contextlib.nullcontext)
    torch.manual_seed(1)
    drawn = PerceptualLoss()
    a, b = fast.state_dict(), drawn.state_dict()
    assert list(a) == list(b) and len(a) > 50
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_weights_loaded_later_skips_draws_in_its_thread_only() -> None:
    t = torch.zeros(1000)
    seen: list[Tensor] = []
    with perceptual.weights_loaded_later():
        torch.nn.init.normal_(t)
        nn.Linear(4, 4)  # reset_parameters goes through torch.nn.init too
        other = threading.Thread(target=lambda: seen.append(torch.nn.init.normal_(torch.zeros(1000))))
        other.start()
        other.join()
    assert torch.count_nonzero(t) == 0  # skipped here
    assert torch.count_nonzero(seen[0]) == 1000  # drawn in the other thread
    assert torch.count_nonzero(torch.nn.init.normal_(t)) == 1000  # restored on exit
