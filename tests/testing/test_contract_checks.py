"""tadm.testing's contract checks: every registered built-in rescaler, aligner and backbone passes them (each
small, the diffusion backbones as their tiny random twins), and each property can fail: a plug-in broken in
exactly one way fails exactly that property, with a message naming it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.components.aligners.fixed import FixedTimestep
from tadm.components.rescalers.bicubic import Bicubic
from tadm.components.rescalers.dfrm import DFRM
from tadm.config.plugins import load_plugins
from tadm.contracts import (
    ALIGNERS,
    BACKBONES,
    RESCALERS,
    DiffusionBackbone,
    Distance,
    Rescaler,
    TimestepAligner,
    quantize_8bit,
)
from tadm.ops.diffusion import TimeConvention, reference_alphas_cumprod
from tadm.ops.images import bicubic_down
from tadm.testing import (
    ALIGNER_PROPERTIES,
    BACKBONE_PROPERTIES,
    RESCALER_PROPERTIES,
    AlignerContractTests,
    BackboneContractTests,
    RescalerContractTests,
    check_aligner,
    check_backbone,
    check_rescaler,
)
from tadm.testing.twins.flow_twins import FluxTwin, SD3Twin
from tadm.testing.twins.unet_twins import StableDiffusionTwin

load_plugins(data=False)

#: each built-in, small: the arguments it is checked with (a new built-in without an entry fails a test)
RESCALER_ARGS: dict[str, dict] = {
    "dfrm": dict(scale=16, width=16, pixel_width=4, num_resblocks=1, num_couplings=2, coupling_growth=8),
    "irn": dict(scale=16, num_couplings=1, coupling_growth=8),
    "bicubic": dict(scale=16),
}
ALIGNER_ARGS: dict[str, dict] = {
    "tpm": dict(width=8, hidden=16),
    "spatial_tpm": dict(width=8, head_width=8),
    "fixed": dict(t=200.0),
    "oracle": dict(),
}
#: each built-in backbone as the twin it is tested on (a subclass: the same runtime on random weights)
BACKBONE_TWINS: dict[str, tuple[type[DiffusionBackbone], dict, tuple[str, ...]]] = {
    "space_to_depth": (BACKBONES.get("space_to_depth"), {}, ("rescaler",)),
    "stable_diffusion": (StableDiffusionTwin, {"preset": "tiny-sd21"}, ("rescaler", "enhancer", "joint")),
    "sd3": (SD3Twin, {"preset": "tiny-sd3"}, ("rescaler", "enhancer", "joint")),
    "flux": (FluxTwin, {"preset": "tiny-flux"}, ("rescaler", "enhancer", "joint")),
}


def builtin_names(registry) -> set[str]:
    return {name for name, cls in registry.items() if cls.__module__.startswith("tadm.components.")}


def test_every_builtin_has_its_check() -> None:
    assert builtin_names(RESCALERS) == set(RESCALER_ARGS)
    assert builtin_names(ALIGNERS) == set(ALIGNER_ARGS)
    assert builtin_names(BACKBONES) == set(BACKBONE_TWINS)
    for name, (twin, _, _) in BACKBONE_TWINS.items():
        assert issubclass(twin, BACKBONES.get(name)), f"{twin.__name__} is not a {name} backbone"


@pytest.mark.parametrize("name", sorted(RESCALER_ARGS))
def test_builtin_rescaler_passes(name: str) -> None:
    rescaler = RESCALERS.get(name)(**RESCALER_ARGS[name])
    state = {k: v.clone() for k, v in rescaler.state_dict().items()}
    assert check_rescaler(rescaler) == list(RESCALER_PROPERTIES)
    # the checks work on copies: the instance passed in is untouched
    assert all(torch.equal(v, state[k]) for k, v in rescaler.state_dict().items())
    assert all(p.grad is None for p in rescaler.parameters())


def test_rescaler_for_another_backbone_passes() -> None:
    """The quickstart's rescaler (bicubic residuals on the 192-channel space_to_depth latent) is checked and
    stepped on its own backbone, which serves stage 1 only."""
    space_to_depth = BACKBONES.get("space_to_depth")
    rescaler = slim_dfrm(latent_channels=192, bicubic_skip=True, detail_residual=True)
    assert check_rescaler(rescaler, backbone=space_to_depth, stages=("rescaler",)) == list(
        RESCALER_PROPERTIES
    )


@pytest.mark.parametrize("name", sorted(ALIGNER_ARGS))
def test_builtin_aligner_passes(name: str) -> None:
    aligner = ALIGNERS.get(name)(**ALIGNER_ARGS[name])
    assert check_aligner(aligner) == list(ALIGNER_PROPERTIES)
    assert "_time_convention" not in aligner.__dict__  # attached on copies only


@pytest.mark.parametrize("name", sorted(BACKBONE_TWINS))
def test_builtin_backbone_passes(name: str) -> None:
    cls, kwargs, stages = BACKBONE_TWINS[name]
    backbone = cls(**kwargs)
    assert check_backbone(backbone, stages=stages) == list(BACKBONE_PROPERTIES)
    assert not list(backbone.parameters())  # loaded copies only: the instance stays unloaded


def test_contract_test_classes_cover_every_property() -> None:
    """The pytest classes' tests together run every property of their kind."""
    for cls, props, check in (
        (RescalerContractTests, RESCALER_PROPERTIES, "check_rescaler"),
        (AlignerContractTests, ALIGNER_PROPERTIES, "check_aligner"),
        (BackboneContractTests, BACKBONE_PROPERTIES, "check_backbone"),
    ):
        seen: list[str] = []

        def record(subject: object, only: tuple[str, ...], seen: list[str] = seen, **_: object) -> list[str]:
            seen.extend(only)
            return list(only)

        instance = cls()
        for attr in ("make_rescaler", "make_aligner", "make_backbone"):
            if hasattr(instance, attr):
                setattr(instance, attr, lambda: None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(f"{cls.__module__}.{check}", record)
            for test in [a for a in dir(cls) if a.startswith("test_")]:
                getattr(instance, test)()
        assert sorted(seen) == sorted(props), cls.__name__


class TestFixedTimestepThroughTheClass(AlignerContractTests):
    """The pytest form on a built-in: four tests collected from the inherited class (its stage step ran in
    ``test_builtin_aligner_passes``: here ``check_options`` leaves it out, as a plug-in may)."""

    check_options = {"stages": ()}

    def make_aligner(self) -> FixedTimestep:
        return FixedTimestep(t=50.0)


# ----------------------------------------------------------------------------- rescalers broken one way
class HalfScaleLR(Bicubic):
    """Downscales by half the scale it reports."""

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return quantize_8bit(bicubic_down(x, self.scale // 2), training=False)


class OutOfRangeLR(Bicubic):
    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return super().downscale(x, z) * 1.5


class ContinuousLR(Bicubic):
    """Never rounds: the LR image it returns is not what an 8-bit PNG stores."""

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return bicubic_down(x, self.scale).clamp(-1, 1)


class WrongUpscaleSize(Bicubic):
    def upscale(self, y: Tensor) -> Tensor:
        return super().upscale(y)[..., :-1, :]


class NoisyUpscale(Bicubic):
    """Draws inside upscale instead of through upscale_noise: two calls differ."""

    def upscale(self, y: Tensor) -> Tensor:
        return super().upscale(y) + 0.01 * torch.randn(y.shape[0], 3, *(s * self.scale for s in y.shape[-2:]))


class TinyLearnedRescaler(Rescaler):
    """A minimal trainable pixel rescaler: a learned gain on bicubic down and up."""

    space = "pixel"

    def __init__(self, scale: int = 16) -> None:
        super().__init__(scale)
        self.gain = nn.Parameter(torch.ones(()))

    def gain_value(self) -> Tensor:
        return self.gain

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return quantize_8bit((bicubic_down(x, self.scale) * self.gain_value()).clamp(-1, 1), self.training)

    def upscale(self, y: Tensor) -> Tensor:
        return Bicubic(self.scale).upscale(y) * self.gain_value()

    def training_losses(
        self, x: Tensor, z: Tensor | None, distance: Distance, outputs: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        x_hat = self.upscale(self.downscale(x, z))
        if outputs is not None:
            outputs["z_hat"] = x_hat
        return {"reconstruction": distance(x_hat, x)}


class PerPixelLoss(TinyLearnedRescaler):
    def training_losses(self, x, z, distance, outputs=None):  # type: ignore[no-untyped-def]
        return {"reconstruction": (self.upscale(self.downscale(x, z)) - x).square()}


class UnusedParameter(TinyLearnedRescaler):
    def __init__(self, scale: int = 16) -> None:
        super().__init__(scale)
        self.forgotten = nn.Parameter(torch.zeros(3))


class CachedGain(TinyLearnedRescaler):
    """Reads its gain from a float taken at construction: a loaded checkpoint changes nothing."""

    def __init__(self, scale: int = 16) -> None:
        super().__init__(scale)
        self.cached = float(self.gain.detach())

    def gain_value(self) -> Tensor:
        return self.cached + 0 * self.gain


def slim_dfrm(**kwargs) -> DFRM:
    return DFRM(**{**RESCALER_ARGS["dfrm"], **kwargs})


def test_tiny_learned_rescaler_passes() -> None:
    """The base of the broken ones keeps the contract (so each break is the only one)."""
    assert check_rescaler(TinyLearnedRescaler(), stages=()) == list(RESCALER_PROPERTIES)


@pytest.mark.parametrize(
    ("rescaler", "prop", "why"),
    [
        (HalfScaleLR(16), "downscale", "has shape"),
        (OutOfRangeLR(16), "downscale", "outside \\[-1, 1\\]"),
        (ContinuousLR(16), "8-bit in eval", "not on the 8-bit grid"),
        (WrongUpscaleSize(16), "upscale", "has shape"),
        (NoisyUpscale(16), "deterministic in eval", "differs between two identical calls"),
        (PerPixelLoss(), "training losses", "not a scalar"),
        (UnusedParameter(), "gradients", "reaches 1 trainable parameters: \\['forgotten'\\]"),
        (
            CachedGain(),
            "state dict round trip",
            "do not change when a state dict with other trained tensors is loaded",
        ),
        # built for SD 3's 16 latent channels, stepped on the 4-channel SD 2.1 twin
        (slim_dfrm(latent_channels=16), "stage step", "expects 16 latent channels"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_rescaler_checks_fail(rescaler: Rescaler, prop: str, why: str) -> None:
    with pytest.raises(
        AssertionError, match=f"(?s)rescaler {type(rescaler).__name__} breaks '{prop}': .*{why}"
    ):
        check_rescaler(rescaler, stages=("rescaler",))


# ------------------------------------------------------------------------------ aligners broken one way
class TinyAligner(TimestepAligner):
    """t = t_min + (t_max - t_min) * sigmoid(linear(per-channel mean)): the example plug-in, smaller."""

    def __init__(self, latent_channels: int = 4, t_min: float = 10.0, t_max: float = 200.0) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.t_min, self.t_max = t_min, t_max
        self.linear = nn.Linear(latent_channels, 1)

    def logit(self, z_hat: Tensor) -> Tensor:
        return self.linear(z_hat.float().mean(dim=(2, 3))).squeeze(1)

    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.logit(z_hat))


class PastTMax(TinyAligner):
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return super().forward(z_hat) + (self.t_max - self.t_min)


class ColumnOfTimesteps(TinyAligner):
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return super().forward(z_hat)[:, None]


class BF16Timesteps(TinyAligner):
    def forward(self, z_hat: Tensor, z_true: Tensor | None = None) -> Tensor:
        return super().forward(z_hat).bfloat16()


class MapsTwice(TinyAligner):
    """Maps its current range on every attach_time (the second attach maps already mapped values)."""

    def attach_time(self, time: TimeConvention) -> None:
        self.t_min, self.t_max = time.from_reference(self.t_min), time.from_reference(self.t_max)


class IgnoresChannels(TinyAligner):
    def match_latent_channels(self, channels: int) -> None:
        pass  # neither rebuilds for the backbone's count nor refuses it


class BatchNormalised(TinyAligner):
    """Normalises over the batch: an image's t depends on the others."""

    def logit(self, z_hat: Tensor) -> Tensor:
        logit = super().logit(z_hat)
        return logit - logit.mean()


class UnusedAlignerParameter(TinyAligner):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten = nn.Parameter(torch.zeros(1))


class DropsBias(TinyAligner):
    """Leaves its bias out of the state dict: a checkpoint cannot restore it."""

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        state = super().state_dict(*args, **kwargs)
        state.pop("linear.bias")
        return state


def test_tiny_aligner_passes() -> None:
    assert check_aligner(TinyAligner()) == list(ALIGNER_PROPERTIES)


@pytest.mark.parametrize(
    ("aligner", "prop", "why"),
    [
        (IgnoresChannels(), "latent channels", "latent_channels is 4"),
        (MapsTwice(), "attach time", "after attach_time\\(flow\\) t_min is"),
        (PastTMax(), "timesteps", "outside \\[10.0000, 200.0000\\]"),
        (ColumnOfTimesteps(), "timesteps", "has shape \\(2, 1\\)"),
        (BF16Timesteps(), "timesteps", "use float32"),
        (BatchNormalised(), "deterministic in eval", "t of image 0 changes by"),
        (UnusedAlignerParameter(), "gradients", "\\['forgotten'\\]"),
        (DropsBias(), "state dict round trip", "Missing key.*linear.bias"),
        # built for 16 latent channels, stepped on the 4-channel SD 2.1 twin
        (TinyAligner(latent_channels=16), "stage step", "expects 16 latent channels, the backbone gives 4"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_aligner_checks_fail(aligner: TimestepAligner, prop: str, why: str) -> None:
    channels = 16 if isinstance(aligner, IgnoresChannels) else None
    with pytest.raises(
        AssertionError, match=f"(?s)aligner {type(aligner).__name__} breaks '{prop}': .*{why}"
    ):
        check_aligner(aligner, latent_channels=channels)


# ----------------------------------------------------------------------------- backbones broken one way
class ToyBackbone(DiffusionBackbone):
    """The smallest diffusion backbone: an 8x8 pixel-unshuffle autoencoder with 1x1 convs (frozen) and a
    3x3 conv as the diffusion model (frozen) on SD's schedule, plus a 1x1 adapter the enhancer trains."""

    latent_channels = 4
    downsample_factor = 8

    def __init__(self) -> None:
        super().__init__()
        self.encoder: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self.denoiser: nn.Module | None = None
        self.adapter: nn.Module | None = None

    @property
    def backbone_id(self) -> str:
        return "toy:seed0"

    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        if "vae" in parts and self.encoder is None:
            self.encoder = nn.Conv2d(192, 4, 1).requires_grad_(False)
            self.decoder = nn.Conv2d(4, 192, 1).requires_grad_(False)
        if "unet" in parts and self.denoiser is None:
            self.denoiser = nn.Conv2d(5, 4, 3, padding=1).requires_grad_(False)
            self.adapter = nn.Conv2d(4, 4, 1)
            self.alphas_cumprod = reference_alphas_cumprod()
            self.prediction_type = "epsilon"

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(F.pixel_unshuffle(x, 8))

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(self.decoder(z), 8).clamp(-1, 1)

    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        time = (t.float() / 1000).view(-1, 1, 1, 1).expand(z_t.shape[0], 1, *z_t.shape[-2:])
        return self.denoiser(torch.cat([z_t, time], dim=1)) + self.adapter(z_t)

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        return list(self.adapter.parameters()) if stage != "rescaler" and self.adapter is not None else []


class EagerToy(ToyBackbone):
    def __init__(self) -> None:
        super().__init__()
        self.load(["vae"])


class CoarseLatentToy(ToyBackbone):
    def encode(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(super().encode(x), 2)


class UnclampedToy(ToyBackbone):
    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(self.decoder(z), 8)


class ReloadingToy(ToyBackbone):
    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        self.encoder = None  # rebuilt on every call: a second load_for_stage replaces the modules
        super().load(parts)


class NoScheduleToy(ToyBackbone):
    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        super().load(parts)
        self.alphas_cumprod = None


class CroppingToy(ToyBackbone):
    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        return super().predict(z_t, t)[..., : z_t.shape[-2] // 2 * 2, : z_t.shape[-1] // 2 * 2]


class StrayTrainableToy(ToyBackbone):
    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        super().load(parts)
        if "unet" in parts:
            self.decoder.requires_grad_(True)  # trainable, yet not in trainable_parameters


class UnusedAdapterToy(ToyBackbone):
    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        super().load(parts)
        if "unet" in parts and not hasattr(self, "spare"):
            self.spare = nn.Conv2d(4, 4, 1)

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        spare = list(self.spare.parameters()) if stage != "rescaler" and hasattr(self, "spare") else []
        return super().trainable_parameters(stage) + spare


class CachedAdapterToy(ToyBackbone):
    """Applies its adapter through a copy taken when loading: a loaded checkpoint changes nothing."""

    def load(self, parts) -> None:  # type: ignore[no-untyped-def]
        super().load(parts)
        if self.adapter is not None:
            self.frozen_copy = [self.adapter.weight.detach().clone(), self.adapter.bias.detach().clone()]

    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        time = (t.float() / 1000).view(-1, 1, 1, 1).expand(z_t.shape[0], 1, *z_t.shape[-2:])
        out = self.denoiser(torch.cat([z_t, time], dim=1))
        return out + F.conv2d(z_t, *self.frozen_copy) + 0 * self.adapter(z_t)


def test_toy_backbone_passes() -> None:
    """A third-party backbone in 40 lines keeps the contract (and each break below is the only one)."""
    assert check_backbone(ToyBackbone()) == list(BACKBONE_PROPERTIES)


@pytest.mark.parametrize(
    ("backbone", "prop", "why"),
    [
        (EagerToy(), "construction", "a new backbone holds 1732 parameters"),
        (ReloadingToy(), "stage loading", "twice rebuilt parts"),
        (NoScheduleToy(), "stage loading", "has_diffusion is False after load_for_stage\\('enhancer'\\)"),
        (
            CoarseLatentToy(),
            "encode decode",
            "encode's latent has shape \\(1, 4, 4, 4\\), expected \\(1, 4, 8, 8\\)",
        ),
        (UnclampedToy(), "encode decode", "not clamped"),
        (CroppingToy(), "predict", "predict on a 7x9 latent has shape"),
        (StrayTrainableToy(), "trainable parameters", "not in trainable_parameters are trainable.*decoder"),
        (
            UnusedAdapterToy(),
            "gradients",
            "reaches 2 trainable parameters: \\['spare.weight', 'spare.bias'\\]",
        ),
        (
            CachedAdapterToy(),
            "state dict round trip",
            "do not change when a state dict with other trained tensors is loaded",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_backbone_checks_fail(backbone: DiffusionBackbone, prop: str, why: str) -> None:
    with pytest.raises(
        AssertionError, match=f"(?s)backbone {type(backbone).__name__} breaks '{prop}': .*{why}"
    ):
        check_backbone(backbone)


def test_backbone_stage_step_fails_on_its_own() -> None:
    """The stage step catches a trainable parameter the training loss never reaches by itself."""
    with pytest.raises(
        AssertionError, match="breaks 'stage step': .*no gradient from the stage-'enhancer' loss"
    ):
        check_backbone(UnusedAdapterToy(), only=("stage step",))
