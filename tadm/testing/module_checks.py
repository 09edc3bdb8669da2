"""What the contract checks of every plug-in kind share: named properties run in order, each failing with
an AssertionError that names the plug-in and the property, and the checks any trainable ``nn.Module``
must pass (finite outputs, gradients that reach every trainable parameter, a state-dict round trip).

Modelled on diffusers' ``ModelTesterMixin`` (output shapes, determinism, save/load round trip, training),
but as plain functions a third party calls in one line, on the CPU, in a few seconds.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: one property of a contract: raises AssertionError (or anything else) when the plug-in breaks it
Property = Callable[[Any], None]


def run_properties(
    subject: str, properties: Mapping[str, Property], case: object, only: Collection[str] | None = None
) -> list[str]:
    """Run the named ``properties`` on ``case`` in order (``only``: a subset); returns the names run.

    The first one that fails raises an AssertionError ``"<subject> breaks '<property>': <why>"``; an
    exception other than an assertion (a crash inside the plug-in) fails the property the same way, with
    the exception as its cause, so a test report always says which promise was broken.
    Runs under a forked, seeded RNG: reproducible, and the caller's random state is left as it was.
    """
    unknown = sorted(set(only or ()) - set(properties))
    if unknown:
        raise ValueError(f"unknown properties {unknown}; choose from {list(properties)}")
    done = []
    for name, check in properties.items():
        if only is not None and name not in only:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                check(case)
            except AssertionError as e:
                raise AssertionError(f"{subject} breaks {name!r}: {e}") from e
            except Exception as e:
                raise AssertionError(f"{subject} breaks {name!r}: {type(e).__name__}: {e}") from e
        done.append(name)
    return done


def expect(condition: bool, message: str) -> None:
    """An assertion that survives ``python -O`` (checks must never be skipped silently)."""
    if not condition:
        raise AssertionError(message)


def expect_finite(name: str, value: Tensor) -> None:
    expect(value.is_floating_point(), f"{name} has dtype {value.dtype}, expected a floating point tensor")
    expect(bool(torch.isfinite(value).all()), f"{name} holds NaN or inf")


def expect_shape(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    expect(tuple(value.shape) == shape, f"{name} has shape {tuple(value.shape)}, expected {shape}")


def expect_equal(name: str, a: Tensor, b: Tensor) -> None:
    expect(a.shape == b.shape and torch.equal(a, b), f"{name} differs between two identical calls")


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def expect_gradients_reach(module: nn.Module, what: str) -> None:
    """After a backward pass: every trainable parameter of ``module`` has a finite gradient (None means
    the parameter is not in the graph: it would never train), and no frozen one has any."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    expect(not missing, f"no gradient from {what} reaches {len(missing)} trainable parameters: {missing[:5]}")
    bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    expect(not bad, f"the gradient of {what} is NaN or inf for {bad[:5]}")
    frozen = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    expect(not frozen, f"frozen parameters got a gradient from {what}: {frozen[:5]}")


@contextmanager
def no_grads_left(module: nn.Module) -> Iterator[None]:
    """Clear the gradients a check made, whatever happens (the checked module is the caller's)."""
    try:
        yield
    finally:
        module.zero_grad(set_to_none=True)


def perturbed_state(state: Mapping[str, Tensor], keys: Collection[str]) -> dict[str, Tensor]:
    """The floating tensors under ``keys`` moved by a small random amount (5 % of their mean magnitude, or
    0.05 when that is 0), the rest as they are."""
    out = {}
    for k, v in state.items():
        if k in keys and v.is_floating_point() and v.numel():
            size = float(v.detach().float().abs().mean()) or 1.0
            v = v + 0.05 * size * torch.randn_like(v)
        out[k] = v
    return out


def expect_state_dict_round_trip(
    module: nn.Module, outputs: Callable[[nn.Module], dict[str, Tensor]], forbidden: Collection[str] = ()
) -> None:
    """Save the state dict of ``module``, load other weights into it, then the saved ones back (diffusers'
    ``test_from_save_pretrained``, without a config to rebuild from; no copy: a loaded backbone is big).

    The state dict survives ``torch.save`` / ``torch.load`` (tensors only) and reloads strictly; loading one
    whose trained tensors (the trainable parameters; every tensor when none is) are perturbed changes
    ``outputs``, as training does (so they come from the state dict, not from a copy taken when the module
    was built or loaded); loading the saved one back restores every entry and outputs identical to the
    first (eval mode). ``forbidden``: keys that must not be in the state dict (what another part owns).
    """
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    leaked = sorted(set(forbidden) & set(state))
    expect(not leaked, f"the state dict holds {leaked}, which belongs to another part")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    expect(set(saved) == set(state), "torch.save / torch.load of the state dict lost keys")
    trained = set(trainable(module)) & set(state) or set(state)
    with torch.no_grad(), evaluating(module):
        before = outputs(module)
        module.load_state_dict(perturbed_state(state, trained), strict=True)
        if any(state[k].is_floating_point() and state[k].numel() for k in trained):
            moved = outputs(module)
            expect(
                any(not torch.equal(before[k], moved[k]) for k in before),
                "outputs do not change when a state dict with other trained tensors is loaded: they do "
                "not come from the state dict (a copy taken when the module was built or loaded?)",
            )
        module.load_state_dict(saved, strict=True)
        after = outputs(module)
    for key, value in module.state_dict().items():
        expect(torch.equal(value, state[key]), f"state dict entry {key!r} differs after the round trip")
    for key in before:
        expect(torch.equal(before[key], after[key]), f"{key} differs after the state-dict round trip")


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then every submodule back in the mode it was in."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, size: int, seed: int = 0) -> Tensor:
    """Reproducible test images in [-1, 1]: smooth colour fields with some fine texture."""
    g = generator(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + 0.2 * torch.randn(batch, 3, size, size, generator=g)).clamp(-1.0, 1.0)


def latents(batch: int, channels: int, height: int, width: int, seed: int = 1) -> Tensor:
    """Reproducible unit-variance latents (every backbone's scaled latents are about unit variance)."""
    return torch.randn(batch, channels, height, width, generator=generator(seed))
