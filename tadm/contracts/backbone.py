"""The backbone contract: latent encode/decode for every stage, one-step prediction for the enhancer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from tadm.contracts.registry import Registry
from tadm.ops.diffusion import DDPMTime, TimeConvention

Stage = Literal["rescaler", "enhancer", "joint"]
Part = Literal["vae", "unet", "text"]

STAGE_PARTS: dict[str, frozenset[str]] = {
    "rescaler": frozenset({"vae"}),
    "enhancer": frozenset({"vae", "unet", "text"}),
    "joint": frozenset({"vae", "unet", "text"}),
}


class DiffusionBackbone(nn.Module, ABC):
    """A latent autoencoder plus (optionally) a diffusion model and its noise schedule.

    Construction is cheap: it records where weights come from. :meth:`load` then builds only
    the parts a training stage needs (stage 1 needs the VAE alone), so ``--print_config`` and
    stage-1 runs never touch UNet or text-encoder weights.

    Every latent is in the *scaled* space: ``encode`` returns ``E(x) * scaling_factor`` and
    ``decode`` expects the same.

    What the enhancer (stages 2/3) reads is declared here, so the core never probes for it:
    :attr:`time_convention` (how timesteps relate to noise: DDPM from :attr:`alphas_cumprod` and
    :attr:`prediction_type` by default, rectified flow for SD 3 / FLUX; None until a diffusion model is
    loaded, and always None for an autoencoder-only backbone) and :meth:`predict`.
    """

    #: channels of the latent ``encode`` returns
    latent_channels: int
    #: spatial downsampling of the latent relative to the image
    downsample_factor: int = 8
    #: multiplier applied to the raw latent
    scaling_factor: float = 1.0
    #: True when ``encode`` draws a sample of the posterior instead of its mean (cached latents then
    #: hold one sample per crop)
    sample_latent: bool = False
    #: latent sizes the diffusion model takes are multiples of this (a DiT's patch size, 2); ``predict``
    #: accepts any size (it pads), and tiling aligns enhancer tiles to it
    latent_multiple: int = 1
    #: the diffusion model's output: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (a rectified-flow
    #: velocity; None: no diffusion model)
    prediction_type: str | None
    #: training noise schedule, (T,) alpha-bar per integer timestep (None: no diffusion model)
    alphas_cumprod: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.prediction_type = None
        # a non-persistent buffer: it follows .to(device) but is never written into checkpoints
        self.register_buffer("alphas_cumprod", None, persistent=False)

    @property
    @abstractmethod
    def backbone_id(self) -> str:
        """Identifies the weights (preset + source); checkpoints record it."""

    @abstractmethod
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet``, ``text``); idempotent."""

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> scaled latent (B,C,H/f,W/f)."""

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1] (clamped)."""

    @property
    def time_convention(self) -> TimeConvention | None:
        """How this backbone's timesteps relate to noise (x0 formula, noise ratio, TADM's reference timesteps
        in its units); None without a diffusion model. Default: the DDPM schedule :attr:`alphas_cumprod` with
        :attr:`prediction_type`, whose reference map is the identity for 1000 steps (every SD family)."""
        if self.alphas_cumprod is None or self.prediction_type is None:
            return None
        return DDPMTime(self.alphas_cumprod, self.prediction_type)

    @property
    def has_diffusion(self) -> bool:
        """True once a diffusion model and its time convention are loaded (the enhancer needs them)."""
        return self.time_convention is not None

    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        """One call of the diffusion model on scaled latents at timesteps ``t`` (B,) in its own units,
        unconditioned (the empty prompt for text-conditioned models); returns its raw output (eps, v, x0 or
        the flow velocity)."""
        raise NotImplementedError(
            f"backbone {self.backbone_id} has no diffusion model: it serves stage 1 (rescaler) only"
        )

    def save_prompt_embedding(self, path: str | Path) -> Path:
        """Write the empty-prompt conditioning to a file the backbone can read instead of loading its text
        encoders (``tadm embed-prompt``; the DiT backbones' ``prompt_embedding``)."""
        raise NotImplementedError(
            f"backbone {self.backbone_id} does not read its prompt embedding from a file (only the SD 3 / "
            "FLUX backbones do: their T5-XXL encoder is too big to load on every training node)"
        )

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> None:
        """Speed-ups for inference on a loaded backbone: NHWC memory format for its networks and
        ``torch.compile`` of its diffusion model. Nothing to do for a weight-free backbone."""

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters this backbone trains in ``stage``; nothing is trained in stage 1."""
        return []

    def load_for_stage(self, stage: str) -> None:
        if stage not in STAGE_PARTS:
            raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_PARTS)}")
        self.load(STAGE_PARTS[stage])


#: short names of backbones (``class_path: stable_diffusion``)
BACKBONES = Registry("backbone", DiffusionBackbone)
