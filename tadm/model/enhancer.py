"""The hybrid time scheduler of TADM's one-step enhancer (docs/method.md, pipeline step 5).

z0_hat = S_fixed(z_hat, out, t0) + Refiner(z_hat, out, t_hat): the UNet runs at the aligner's
t_hat, but its output is turned into a clean latent with the ordinary one-step DDPM formula at
a CONSTANT t0 = 50, and a small zero-initialised Refiner learns the correction. Training thus
starts exactly from the fixed branch, and the aligner learns through the time embeddings of the
UNet and the Refiner.

The arithmetic is the backbone's :class:`~tadm.ops.diffusion.TimeConvention`: DDPM alpha-bar formulas
for the SD UNets, x0 = z_t - sigma * v for the rectified-flow transformers (SD 3, FLUX.1). ``t0`` is
written in TADM's reference units and mapped like the aligners' ranges (the identity on SD). Timesteps
reach the Refiner in the backbone's units, which are 0 .. 1000 for both kinds, so its sinusoidal
embedding needs no change.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadm.ops.blocks import Activation, ConvBlock, ResBlock
from tadm.ops.diffusion import DDPMTime, TimeConvention

Mode = Literal["hybrid", "fixed_only", "learned_t"]
MODES: tuple[str, ...] = ("hybrid", "fixed_only", "learned_t")


def unet_timestep(t: Tensor) -> Tensor:
    """The (B,) timestep for the UNet: ``t`` itself, or the per-sample mean of a (B,1,h,w) map.

    The UNet's time embedding takes one value per sample; the mean keeps the map's gradient.
    """
    if t.ndim == 1:
        return t
    if t.ndim == 4 and t.shape[1] == 1:
        return t.mean(dim=(1, 2, 3))
    raise ValueError(f"a timestep must be (B,) or a (B,1,h,w) map, got shape {tuple(t.shape)}")


class Refiner(nn.Module):
    """Learned correction of the fixed-t0 estimate, conditioned on the aligner's t (about 0.46 M).

    concat(z_hat, model_output) -> ConvBlock(width); ``num_blocks`` x [ResBlock, + time
    embedding]; zero-initialised 3x3 conv -> C, so it outputs exactly 0 at init. One
    Timesteps + TimestepEmbedding (diffusers) is shared by all blocks (the release's 0.46 M
    count). A (B,1,h,w) timestep map is embedded per pixel, so a spatial aligner really steers it.
    The release options change arithmetic only: the parameter names stay, so its weights load.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        width: int = 64,
        num_blocks: int = 6,
        time_dim: int = 64,
        activation: Activation = "leaky_relu",
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
        tail_activation: bool = False,
    ) -> None:
        """
        Args:
            latent_channels: channels of the latent (C); the input has 2C (z_hat and model output).
            width: feature channels.
            num_blocks: ResBlocks, each followed by adding the time embedding.
            time_dim: size of the sinusoidal timestep features.
            activation: of the residual blocks: ``leaky_relu`` (tadm) or ``relu`` (the release's BasicSR
                ``ResidualBlockNoBN``: ReLU, kaiming x 0.1 init).
            flip_sin_to_cos: order of the sinusoidal features, cos first (tadm, as SD's UNet); the
                release builds ``Timesteps(64, False, 1)``: sin first.
            freq_shift: diffusers' ``downscale_freq_shift`` of the sinusoidal features (release: 1).
            tail_activation: a LeakyReLU(0.1) after the zero-initialised output conv, as the release's
                ``zero_conv_out`` (a ConvBlock) has; it damps negative corrections tenfold.
        """
        super().__init__()
        self.head = ConvBlock(2 * latent_channels, width)
        self.blocks = nn.ModuleList(ResBlock(width, activation) for _ in range(num_blocks))
        # diffusers is imported here, not at the top: a stage-1 model (the codec) never builds a Refiner
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
        self.time_embedding = TimestepEmbedding(time_dim, width)
        self.tail = nn.Conv2d(width, latent_channels, 3, padding=1)
        self.tail_activation = tail_activation
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def embed_time(self, t: Tensor, batch: int, size: tuple[int, int]) -> Tensor:
        """(B,) / scalar -> (B,width,1,1); (B,1,h,w) map -> (B,width,h,w), embedded per pixel."""
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            if t.shape[0] != batch:
                raise ValueError(f"Refiner: {t.shape[0]} timesteps for a batch of {batch}")
            flat = t
        elif t.ndim == 4 and t.shape[1] == 1 and t.shape[0] == batch and tuple(t.shape[2:]) == size:
            flat = t.permute(0, 2, 3, 1).reshape(-1)
        else:
            raise ValueError(
                f"Refiner: timestep must be (B,) or a (B,1,h,w) map at the latent size {(batch, 1, *size)}, "
                f"got {tuple(t.shape)}"
            )
        emb = self.time_proj(flat).to(self.time_embedding.linear_1.weight.dtype)
        emb = self.time_embedding(emb)
        if t.ndim == 1:
            return emb[:, :, None, None]
        return emb.reshape(batch, *size, -1).permute(0, 3, 1, 2)

    def forward(self, z_hat: Tensor, model_output: Tensor, t: Tensor) -> Tensor:
        b, _, h, w = z_hat.shape
        emb = self.embed_time(t, b, (h, w))
        x = self.head(torch.cat([z_hat, model_output], dim=1))
        for block in self.blocks:
            x = block(x) + emb
        out = self.tail(x)
        return F.leaky_relu(out, 0.1) if self.tail_activation else out


class HybridScheduler(nn.Module):
    """Turns the one-step UNet output into z0_hat: fixed-t0 estimate plus the Refiner.

    Modes (the paper's method and two ablations):

    - ``hybrid`` (the method): x0(z_hat, out, abar(t0)) + Refiner(z_hat, out, t).
    - ``fixed_only``: x0(z_hat, out, abar(t0)) alone ("fixed branch only"); the Refiner is kept
      (same checkpoint keys) but frozen and unused.
    - ``learned_t``: x0(z_hat, out, abar(t)) + Refiner(z_hat, out, t) ("learned t in the fixed
      branch"); a (B,1,h,w) map gives a per-pixel alpha-bar.

    In ``hybrid`` and ``fixed_only`` the x0 formula uses the constant t0 even though the UNet ran
    at t (docs/method.md step 5).
    """

    def __init__(
        self,
        t0: float = 50.0,
        mode: Mode = "hybrid",
        latent_channels: int | None = None,
        width: int = 64,
        num_blocks: int = 6,
        time_dim: int = 64,
        refiner_activation: Activation = "leaky_relu",
        refiner_flip_sin_to_cos: bool = True,
        refiner_freq_shift: float = 0.0,
        refiner_tail_activation: bool = False,
    ) -> None:
        """
        Args:
            t0: the constant timestep of the fixed branch (the paper: 50), in TADM's reference units (SD's
                1000-step schedule); a flow backbone maps it to the same noise level (sigma 0.184).
            mode: ``hybrid`` (the method), ``fixed_only`` or ``learned_t`` (ablations; see the class doc).
            latent_channels: channels of the latent. Default: the backbone's (built for 4, the SD VAEs', and
                rebuilt for 16 on SD 3 / FLUX by :meth:`match_latent_channels`); a number is checked instead.
            width: Refiner feature channels.
            num_blocks: Refiner ResBlocks.
            time_dim: size of the Refiner's sinusoidal timestep features.
            refiner_activation: the Refiner's residual-block activation (release: ``relu``).
            refiner_flip_sin_to_cos: the Refiner's sinusoid order (release: ``false``, sin first).
            refiner_freq_shift: the Refiner's ``downscale_freq_shift`` (release: 1).
            refiner_tail_activation: LeakyReLU(0.1) after the Refiner's output conv (release: ``true``).
        """
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown HybridScheduler mode {mode!r}; choose one of {list(MODES)}")
        if t0 < 0:
            raise ValueError(f"t0 must be >= 0, got {t0}")
        self.t0 = float(t0)
        self.mode = mode
        self.follows_backbone = latent_channels is None
        self.latent_channels = 4 if latent_channels is None else latent_channels
        self._refiner_args = dict(
            width=width,
            num_blocks=num_blocks,
            time_dim=time_dim,
            activation=refiner_activation,
            flip_sin_to_cos=refiner_flip_sin_to_cos,
            freq_shift=refiner_freq_shift,
            tail_activation=refiner_tail_activation,
        )
        self._build_refiner()
        #: (time convention, t0, t0 in its units), set by :meth:`attach_time`
        self._fixed_t: tuple[TimeConvention, float, float] | None = None

    def _build_refiner(self) -> None:
        self.refiner = Refiner(self.latent_channels, **self._refiner_args)  # type: ignore[arg-type]
        if self.mode == "fixed_only":
            # unused: keep it out of optimisers and out of DDP's unused-parameter check
            self.refiner.requires_grad_(False)

    def match_latent_channels(self, channels: int) -> None:
        """Called by the model with the backbone's latent channels before any weights are loaded: a Refiner
        that follows the backbone is rebuilt (zero-initialised) for them; a fixed count must match."""
        if channels == self.latent_channels:
            return
        if not self.follows_backbone:
            raise ValueError(
                f"model.enhancer expects {self.latent_channels} latent channels, the backbone gives {channels}"
            )
        device = self.refiner.tail.weight.device
        self.latent_channels = channels
        self._build_refiner()
        self.refiner.to(device)

    def attach_time(self, time: TimeConvention) -> None:
        """The backbone's time convention, once (``TADMModel.load_parts``): t0 is mapped into its units here,
        not on every call. A flow convention maps it with host tensors, which would break a compiled forward's
        graph (``tadm upscale --compile``) on every tile."""
        self._fixed_t = (time, self.t0, time.from_reference(self.t0))

    def fixed_timestep(self, time: TimeConvention) -> float:
        """The fixed branch's t0 in ``time``'s units (computed once for the attached convention)."""
        if self._fixed_t is not None and self._fixed_t[0] is time and self._fixed_t[1] == self.t0:
            return self._fixed_t[2]
        return time.from_reference(self.t0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters this scheduler trains: the Refiner's, none in ``fixed_only``."""
        return [] if self.mode == "fixed_only" else list(self.refiner.parameters())

    def forward(
        self,
        z_hat: Tensor,
        model_output: Tensor,
        t: Tensor,
        time: TimeConvention | Tensor,
        prediction_type: str | None = None,
    ) -> Tensor:
        """z0_hat from the diffusion model's output ``model_output`` computed on ``z_hat`` at timestep ``t``.

        Args:
            z_hat: the reconstructed latent (B,C,h,w) the model denoised.
            model_output: the model's prediction (eps, v, sample or flow velocity).
            t: the aligner's timestep in the backbone's units, (B,) or a (B,1,h,w) map.
            time: the backbone's time convention; or, for a DDPM backbone, its training schedule (T,)
                together with ``prediction_type``.
            prediction_type: the DDPM prediction type when ``time`` is a schedule tensor.
        """
        if not isinstance(time, TimeConvention):
            if prediction_type is None:
                raise ValueError("HybridScheduler: a schedule tensor needs its prediction_type")
            time = DDPMTime(time, prediction_type)
        z0 = time.x0(z_hat, model_output, t if self.mode == "learned_t" else self.fixed_timestep(time))
        if self.mode == "fixed_only":
            return z0
        return z0 + self.refiner(z_hat, model_output, t).to(z0.dtype)

    def extra_repr(self) -> str:
        return f"t0={self.t0}, mode={self.mode!r}"
