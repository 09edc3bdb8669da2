"""LPIPS/DISTS loss: values behave, gradients flow, and offline without VGG weights the error names the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
