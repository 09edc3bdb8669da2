"""Contract checks of a diffusion backbone (:class:`tadm.contracts.DiffusionBackbone`), built-in or
third-party, run on a freshly constructed (unloaded) backbone, a random-weight twin of the real one::

    from tadm.testing import check_backbone

    check_backbone(MyBackbone(preset="tiny"))                       # stages 1-3
    check_backbone(MyAutoencoder(), stages=("rescaler",))           # no diffusion model: stage 1 only

Each property is what the core relies on (CONTRIBUTING "Contracts worth knowing"); :func:`check_backbone`
loads copies of the backbone, one per stage, so the instance passed in stays unloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tadm.contracts import STAGE_PARTS, DiffusionBackbone
from tadm.testing.module_checks import (
    expect,
    expect_equal,
    expect_finite,
    expect_gradients_reach,
    expect_shape,
    expect_state_dict_round_trip,
    images,
    latents,
    no_grads_left,
    run_properties,
)
from tadm.testing.stage_checks import default_aligner, expect_part_trains, slim_rescaler, stage_step

#: the stages that need a diffusion model
DIFFUSION_STAGES = ("enhancer", "joint")


@dataclass(frozen=True)
class BackboneCase:
    """A fresh backbone, the inputs its checks use, and its copies loaded per stage (built once)."""

    backbone: DiffusionBackbone
    size: int
    batch: int
    stages: tuple[str, ...]
    loaded_copies: dict[str, DiffusionBackbone] = field(default_factory=dict)

    def fresh(self) -> DiffusionBackbone:
        """A copy of the unloaded backbone (construction is cheap, so a copy is)."""
        return copy.deepcopy(self.backbone)

    def loaded(self, stage: str) -> DiffusionBackbone:
        """A copy with ``load_for_stage(stage)`` done, in eval mode."""
        if stage not in self.loaded_copies:
            backbone = self.fresh()
            backbone.load_for_stage(stage)
            self.loaded_copies[stage] = backbone.eval()
        return self.loaded_copies[stage]

    @property
    def diffusion_stages(self) -> list[str]:
        return [s for s in self.stages if s in DIFFUSION_STAGES]

    def image(self) -> Tensor:
        return images(self.batch, self.size)

    def latent(self, backbone: DiffusionBackbone, size: tuple[int, int] | None = None) -> Tensor:
        h, w = size or (self.size // backbone.downsample_factor,) * 2
        return latents(self.batch, backbone.latent_channels, h, w)

    def timesteps(self, backbone: DiffusionBackbone) -> Tensor:
        """(B,) timesteps in the backbone's units: TADM's reference t = 200 (the TPM's t_max) mapped."""
        time = backbone.time_convention
        expect(time is not None, "time_convention is None after loading a stage that enhances")
        assert time is not None
        return torch.full((self.batch,), time.from_reference(200.0))


def _layout(backbone: DiffusionBackbone) -> dict[str, object]:
    return {
        "latent_channels": backbone.latent_channels,
        "downsample_factor": backbone.downsample_factor,
        "scaling_factor": float(backbone.scaling_factor),
    }


def _construction(case: BackboneCase) -> None:
    """Construction only records where weights come from: no parameters until ``load``, yet a
    ``backbone_id`` and the latent layout (the CLI links it into the rescaler before any weight loads)."""
    b = case.fresh()
    n = sum(p.numel() for p in b.parameters())
    expect(
        n == 0,
        f"a new backbone holds {n} parameters: build them in load(parts), not in __init__ (or pass "
        "check_backbone a freshly constructed backbone)",
    )
    expect(isinstance(b.backbone_id, str) and bool(b.backbone_id), f"backbone_id is {b.backbone_id!r}")
    c, f = b.latent_channels, b.downsample_factor
    expect(isinstance(c, int) and c > 0, f"latent_channels is {c!r}")
    expect(isinstance(f, int) and f >= 1 and case.size % f == 0, f"downsample_factor is {f!r}")
    expect(b.latent_multiple >= 1, f"latent_multiple is {b.latent_multiple}")


def _stage_loading(case: BackboneCase) -> None:
    """``load_for_stage`` builds what each stage needs and nothing more: stage 1 no diffusion model; each
    diffusion stage one with a time convention. Loading keeps ``backbone_id`` and the reported latent
    layout, and loading again changes nothing; an unknown stage is an error."""
    before = case.fresh()
    for stage in ("rescaler", *case.diffusion_stages):
        b = case.loaded(stage)
        expect(b.backbone_id == before.backbone_id, f"backbone_id changed on load_for_stage({stage!r})")
        expect(
            _layout(b) == _layout(before),
            f"the latent layout reported before loading {_layout(before)} is not the loaded one {_layout(b)}",
        )
        ids = [id(p) for p in b.parameters()]
        b.load_for_stage(stage)
        expect([id(p) for p in b.parameters()] == ids, f"load_for_stage({stage!r}) twice rebuilt parts")
        parts = sorted(STAGE_PARTS[stage])
        expect(
            b.has_diffusion == (stage in DIFFUSION_STAGES),
            f"has_diffusion is {b.has_diffusion} after load_for_stage({stage!r}) (parts {parts})",
        )
    try:
        case.fresh().load_for_stage("no-such-stage")
    except ValueError:
        return
    raise AssertionError("load_for_stage('no-such-stage') did not raise ValueError")


def _encode_decode(case: BackboneCase) -> None:
    """``encode``: (B,3,H,W) in [-1,1] -> scaled latent (B, latent_channels, H/f, W/f), float32, finite, the
    same latent twice (unless ``sample_latent``); ``decode``: back to (B,3,H,W) in [-1,1], clamped even for a
    far-off latent."""
    b = case.loaded("rescaler")
    x = case.image()
    f = b.downsample_factor
    with torch.no_grad():
        z = b.encode(x)
        expect_shape("encode's latent", z, (case.batch, b.latent_channels, case.size // f, case.size // f))
        expect(z.dtype == torch.float32, f"encode returns {z.dtype}, expected float32")
        expect_finite("encode's latent", z)
        if not b.sample_latent:
            expect_equal("encode", z, b.encode(x))
        for what, latent in (("its latent", z), ("a latent x 50", z * 50.0)):
            image = b.decode(latent)
            expect_shape(f"decode of {what}", image, tuple(x.shape))
            expect(image.dtype == torch.float32, f"decode returns {image.dtype}, expected float32")
            expect_finite(f"decode of {what}", image)
            lo, hi = float(image.min()), float(image.max())
            expect(
                lo >= -1.0 and hi <= 1.0,
                f"decode of {what} spans [{lo:.3f}, {hi:.3f}], not clamped to [-1, 1]",
            )


def _predict(case: BackboneCase) -> None:
    """``predict(z_t, t)``, t (B,) in its own units: an output of z_t's shape, float32, finite, for any latent
    size (sizes off ``latent_multiple`` are padded inside)."""
    for stage in case.diffusion_stages[:1]:
        b = case.loaded(stage)
        side = case.size // b.downsample_factor
        for size in ((side, side), (side - 1, side + 1)):
            z_t = case.latent(b, size)
            with torch.no_grad():
                out = b.predict(z_t, case.timesteps(b))
            expect_shape(f"predict on a {size[0]}x{size[1]} latent", out, tuple(z_t.shape))
            expect(out.dtype == torch.float32, f"predict returns {out.dtype}, expected float32")
            expect_finite("predict's output", out)


def _trainable_parameters(case: BackboneCase) -> None:
    """Stage 1 trains nothing of the backbone; each diffusion stage trains exactly the parameters
    ``trainable_parameters(stage)`` lists (every other weight frozen), and at least one."""
    expect(case.loaded("rescaler").trainable_parameters("rescaler") == [], "stage 1 trains backbone weights")
    for stage in case.diffusion_stages:
        b = case.loaded(stage)
        listed = b.trainable_parameters(stage)
        expect(bool(listed), f"trainable_parameters({stage!r}) is empty: stage {stage!r} would not adapt it")
        expect(
            len({id(p) for p in listed}) == len(listed),
            f"trainable_parameters({stage!r}) repeats a parameter",
        )
        ids = {id(p) for p in listed}
        names = {id(p): n for n, p in b.named_parameters()}
        foreign = [p for p in listed if id(p) not in names]
        expect(
            not foreign,
            f"trainable_parameters({stage!r}) lists {len(foreign)} parameters the backbone does not hold",
        )
        frozen = [names[i] for i in ids if not b.get_parameter(names[i]).requires_grad]
        expect(not frozen, f"trainable_parameters({stage!r}) lists frozen parameters {frozen[:5]}")
        stray = [n for n, p in b.named_parameters() if p.requires_grad and id(p) not in ids]
        expect(
            not stray,
            f"after load_for_stage({stage!r}) weights not in trainable_parameters are trainable: {stray[:5]}",
        )


def _gradients(case: BackboneCase) -> None:
    """Through ``predict`` and ``decode`` (the enhancer's path), gradients reach every trainable parameter of
    the first diffusion stage, finite, and no frozen weight gets one."""
    for stage in case.diffusion_stages[:1]:
        b = case.loaded(stage).train()
        try:
            with no_grads_left(b):
                z_t = case.latent(b)
                out = b.predict(z_t, case.timesteps(b))
                (out.square().mean() + b.decode(z_t - out).square().mean()).backward()
                expect_gradients_reach(b, "predict and decode")
        finally:
            b.eval()


def _state_dict_round_trip(case: BackboneCase) -> None:
    """Saved and reloaded into a copy with other weights, the loaded backbone (its most complete stage)
    encodes, decodes and predicts identically."""
    stage = (case.diffusion_stages or ["rescaler"])[0]
    b = case.loaded(stage)
    x = case.image()
    z = case.latent(b)
    t = case.timesteps(b) if stage != "rescaler" else None

    def outputs(m: nn.Module) -> dict[str, Tensor]:
        assert isinstance(m, DiffusionBackbone)
        out = {"encode": m.encode(x), "decode": m.decode(z)}
        if t is not None:
            out["predict"] = m.predict(z, t)
        return out

    expect_state_dict_round_trip(b, outputs)


def _stage_steps(case: BackboneCase) -> None:
    """One step of stage 1 (a slim DFRM on its latent trains, the backbone stays frozen) and of the first
    diffusion stage (the backbone's trainable parameters move, under the TPM): finite loss, frozen weights
    untouched. Stage 3's trainable set is checked by "trainable parameters"; the rescaler checks step it.
    """
    for stage in [s for s in case.stages if s == "rescaler"] + case.diffusion_stages[:1]:
        backbone = case.fresh()
        aligner = default_aligner() if stage != "rescaler" else None
        result = stage_step(stage, backbone, slim_rescaler(backbone), aligner, size=case.size)
        expect_part_trains(result, "rescaler" if stage == "rescaler" else "backbone", stage)


BACKBONE_PROPERTIES = {
    "construction": _construction,
    "stage loading": _stage_loading,
    "encode decode": _encode_decode,
    "predict": _predict,
    "trainable parameters": _trainable_parameters,
    "gradients": _gradients,
    "state dict round trip": _state_dict_round_trip,
    "stage step": _stage_steps,
}


def check_backbone(
    backbone: DiffusionBackbone,
    *,
    size: int = 64,
    batch: int = 1,
    stages: tuple[str, ...] = ("rescaler", "enhancer", "joint"),
    only: Collection[str] | None = None,
) -> list[str]:
    """Run every backbone contract check (:data:`BACKBONE_PROPERTIES`, or ``only`` those) on copies of the
    freshly constructed ``backbone``; raises AssertionError naming the first property it breaks, returns the
    names checked.

    Args:
        backbone: an unloaded backbone with random (twin) or small weights; it stays unloaded.
        size: image side (a multiple of the downsampling; 64 gives an 8 x 8 latent at factor 8).
        batch: images per call.
        stages: the stages it serves; ``("rescaler",)`` for an autoencoder without a diffusion model.
        only: run just these properties.
    """
    unknown = sorted(set(stages) - set(STAGE_PARTS))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {sorted(STAGE_PARTS)}")
    case = BackboneCase(backbone, size, batch, tuple(stages))
    return run_properties(f"backbone {type(backbone).__name__}", BACKBONE_PROPERTIES, case, only)
