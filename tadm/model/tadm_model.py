"""TADMModel: the whole TADM model as an ordinary ``nn.Module``, with no training loop attached.

The codec, ONNX export, ``tadm evaluate``, the release import and user scripts use it directly; the
LightningModule (:class:`tadm.training.lightning_module.TADMModule`) wraps one for training. Keeping it
free of Lightning keeps a codec start on a stage-1 model near ``import torch`` (``benchmarks/startup.py``).

Construction is cheap (the backbone's contract): :meth:`TADMModel.load_parts` loads the frozen parts a
stage needs, and :meth:`TADMModel.from_checkpoint` builds, loads and fills a model in one call::

    from tadm.model import TADMModel
    model = TADMModel.from_checkpoint("assets/models/quickstart_x16.safetensors")
    lr = model.downscale(x)          # x: (B, 3, H, W) in [-1, 1] -> 8-bit LR image in [-1, 1]
    x_hat = model.upscale(lr, size=x.shape[-2:])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tadm.config.build import build_from_config
from tadm.contracts import DiffusionBackbone, Rescaler, TimestepAligner
from tadm.errors import CheckpointError
from tadm.inference import pipeline
from tadm.inference.tiling import NO_TILING, Tiling
from tadm.model.checkpoints import read_checkpoint
from tadm.model.enhancer import HybridScheduler, unet_timestep
from tadm.model.trained_state import check_compatible, frozen_backbone_keys, load_trained_state

log = logging.getLogger(__name__)

Stage = Literal["rescaler", "enhancer", "joint"]
STAGES: tuple[str, ...] = ("rescaler", "enhancer", "joint")
#: which latent the aligner reads (see ``TADMModel``'s ``aligner_latents``)
AlignerLatents = Literal["scaled", "unscaled", "release"]
ALIGNER_LATENTS: tuple[str, ...] = ("scaled", "unscaled", "release")


class TADMModel(nn.Module):
    """Rescaler, diffusion backbone, timestep aligner and hybrid scheduler: HR -> 8-bit LR -> HR.

    ``stage`` says which parts exist and train: ``rescaler`` (stage 1: the rescaler over the VAE's latent
    space), ``enhancer`` (stage 2: the frozen rescaler plus the one-step diffusion enhancer) or ``joint``
    (stage 3: everything trains).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        rescaler: Rescaler,
        stage: Stage = "rescaler",
        scale: int = 16,
        aligner: TimestepAligner | None = None,
        enhancer: HybridScheduler | None = None,
        aligner_latents: AlignerLatents = "scaled",
    ) -> None:
        """
        Args:
            backbone: the diffusion backbone (VAE, and for later stages UNet and text prior).
            rescaler: the rescaler plug-in (e.g. ``dfrm``, ``irn`` or ``bicubic``). In stages 2/3 a pixel-space
                one's image is encoded by the VAE and enhanced like a latent one's z_hat ("pixel rescaling +
                SD prior", the paper's ablation).
            stage: ``rescaler`` (stage 1), ``enhancer`` (stage 2) or ``joint`` (stage 3).
            scale: HR -> LR factor, linked into the rescaler and the data module by the CLI.
            aligner: chooses the one-step timestep from z_hat (stages 2/3), e.g. ``tpm``, ``fixed``.
            enhancer: the hybrid time scheduler with its Refiner (stages 2/3); default ``HybridScheduler()``.
            aligner_latents: the z_hat the aligner reads. ``scaled`` (tadm: the latent every other part
                sees); ``unscaled``: z_hat / the backbone's scaling factor, as the release's training code
                feeds its TPM (``src/tadm.py``); ``release``: unscaled in training mode, scaled in eval mode,
                as the release's training and its inference script (``src/tadm_tile.py``, what
                ``run_inference.sh`` runs) do. The UNet, the Refiner and the x0 formula always get it scaled.
        """
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose rescaler, enhancer or joint")
        if rescaler.scale != scale:
            raise ValueError(f"rescaler scale {rescaler.scale} differs from model scale {scale}")
        if aligner_latents not in ALIGNER_LATENTS:
            raise ValueError(
                f"unknown aligner_latents {aligner_latents!r}; choose one of {list(ALIGNER_LATENTS)}"
            )
        self.backbone = backbone
        self.rescaler = rescaler
        self.stage: str = stage
        self.scale = scale
        self.aligner_latents = aligner_latents
        self.aligner = aligner
        self.enhancer = enhancer
        self._parts_loaded = False
        self._compiled = False  # prepare_inference(compile=True) has run
        self._check_latent_layout()
        if stage != "rescaler":
            if aligner is None:
                raise ValueError(f"stage {stage!r} needs model.aligner (e.g. class_path: tpm)")
            if enhancer is None:
                self.enhancer = HybridScheduler(latent_channels=backbone.latent_channels)
            self._match_latent_channels()
        rescaler.requires_grad_(stage != "enhancer")
        if stage == "enhancer":
            rescaler.eval()  # frozen: its LR image is the exact 8-bit one the enhancer will see

    # ------------------------------------------------------------------ building
    def load_parts(self) -> TADMModel:
        """Load the frozen backbone parts this stage needs and wire the enhancer to them (once).

        The TPM and the Refiner follow the backbone's latent channels (4 on SD, 16 on SD 3 / FLUX) unless
        given a number, which must match; this happens before any trained weights load, so they load into
        the final shapes. The aligner's configured range is mapped into the backbone's time units.
        """
        if self._parts_loaded:
            return self
        self.backbone.load_for_stage(self.stage)
        self._check_latent_layout()
        if self.stage == "rescaler":
            self.backbone.requires_grad_(False)
        else:
            self._match_latent_channels()
            time = self.backbone.time_convention
            if time is None:
                raise ValueError(
                    f"backbone {self.backbone.backbone_id} has no noise schedule: it cannot enhance"
                )
            assert self.aligner is not None and self.enhancer is not None
            self.aligner.attach_time(time)
            self.enhancer.attach_time(time)
        self._parts_loaded = True
        return self

    @property
    def parts_loaded(self) -> bool:
        """Whether :meth:`load_parts` has run (the frozen backbone parts are in place)."""
        return self._parts_loaded

    def _match_latent_channels(self) -> None:
        assert self.aligner is not None and self.enhancer is not None
        self.aligner.match_latent_channels(self.backbone.latent_channels)
        self.enhancer.match_latent_channels(self.backbone.latent_channels)

    def _check_latent_layout(self) -> None:
        want = self.rescaler.latent_channels
        if self.rescaler.space == "latent" and want is not None and want != self.backbone.latent_channels:
            raise ValueError(
                f"rescaler expects {want} latent channels but backbone {self.backbone.backbone_id} "
                f"produces {self.backbone.latent_channels}"
            )

    @classmethod
    def from_config(
        cls, config_yaml: str, source: str = "config", backbone_pretrained: str | None = None
    ) -> TADMModel:
        """The model a run config (YAML text, e.g. a checkpoint's stored one) describes, parts loaded.

        Only the ``model:`` keys this class takes are read (losses, optimiser and logging belong to
        training); a failure to rebuild is a :class:`~tadm.errors.CheckpointError` naming ``source``.
        """
        return build_from_config(cls, config_yaml, source, backbone_pretrained, then=TADMModel.load_parts)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, weights: str | None = None, backbone_pretrained: str | None = None
    ) -> TADMModel:
        """A Lightning ``.ckpt`` of any stage or an export (``tadm export`` / ``tadm import-release``
        ``.safetensors``) as a ready model in eval mode, on the CPU.

        Args:
            path: the checkpoint or export file.
            weights: ``ema`` or ``raw`` trained tensors (default: the EMA when the file has one).
            backbone_pretrained: load the frozen backbone from this folder / hub id instead of the one the
                checkpoint was trained with (same weights, another place); the recorded id is not checked.
        """
        state, meta = read_checkpoint(path, weights)
        return cls.from_state(state, meta, str(path), backbone_pretrained)

    @classmethod
    def from_state(
        cls,
        state: dict[str, Tensor],
        meta: dict[str, Any],
        source: str,
        backbone_pretrained: str | None = None,
    ) -> TADMModel:
        """What :meth:`from_checkpoint` does once the file is read (:func:`~tadm.model.checkpoints.read_checkpoint`):
        rebuild from the stored config, check the recorded backbone and scale, load the trained tensors."""
        if "weights" in meta:
            log.info("%s: using its %s weights", source, meta["weights"])
        if not meta.get("config"):
            raise CheckpointError(
                f"checkpoint {source} has no stored run config; it cannot be rebuilt for inference"
            )
        model = cls.from_config(meta["config"], source, backbone_pretrained)
        if backbone_pretrained is None:
            model.check_compatible(meta, source)
        else:
            log.warning(
                "backbone replaced by %s: the checkpoint's backbone id is not checked", backbone_pretrained
            )
        model.load_trained_state(state, source)
        return model.eval()

    #: an export is read by the same reader (the file says which format it is)
    from_export = from_checkpoint

    # ------------------------------------------------------------------ which tensors train and are stored
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What this stage trains: the rescaler (stages 1/3), the backbone's LoRA / unfrozen layers, the
        aligner and the Refiner (stages 2/3)."""
        params = (
            [p for p in self.rescaler.parameters() if p.requires_grad] if self.stage != "enhancer" else []
        )
        params += self.backbone.trainable_parameters(self.stage)
        if self.stage != "rescaler":
            assert self.aligner is not None and self.enhancer is not None
            params += [p for p in self.aligner.parameters() if p.requires_grad]
            params += self.enhancer.trainable_parameters()
        return params

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """:meth:`trainable_parameters` with their state-dict names (the keys checkpoints and the EMA use)."""
        names = {id(p): n for n, p in self.named_parameters()}
        return [(names[id(p)], p) for p in self.trainable_parameters()]

    def frozen_keys(self) -> set[str]:
        """State-dict keys checkpoints do not store: the frozen backbone (:mod:`tadm.model.trained_state`)."""
        return frozen_backbone_keys(self.backbone, self.stage)

    def checkpoint_meta(self, config: str | None) -> dict[str, Any]:
        """The ``tadm`` meta dict a checkpoint of this model stores (what :meth:`check_compatible` reads)."""
        return {
            "backbone_id": self.backbone.backbone_id,
            "rescaler": f"{type(self.rescaler).__module__}.{type(self.rescaler).__qualname__}",
            "stage": self.stage,
            "scale": self.scale,
            "config": config,
        }

    def check_compatible(self, meta: dict[str, Any] | None, source: str) -> None:
        """Refuse a checkpoint trained on another backbone or at another scale (naming both)."""
        check_compatible(
            meta,
            source,
            backbone_id=self.backbone.backbone_id,
            scale=self.scale,
            pixel_rescaler=self.rescaler.space == "pixel",
        )

    def load_trained_state(self, state: dict[str, Tensor], source: str, require_all: bool = True) -> None:
        """Load stored (trained) tensors over the frozen backbone: a missing trained tensor is an error when
        ``require_all`` (inference), a warning otherwise (``init_from``)."""
        load_trained_state(self, state, source, self.frozen_keys(), require_all)

    def load_weights(self, path: str) -> None:
        """Weights-only initialisation from another run's checkpoint (``init_from``): its EMA when it has
        one (the weights its validation scored), else its raw weights."""
        state, meta = read_checkpoint(path)
        if meta.get("weights") == "ema":
            log.info("init_from %s: its EMA weights", path)
        self.check_compatible(meta, path)
        self.load_trained_state(state, path, require_all=False)

    # ------------------------------------------------------------------ the enhancer
    def enhance(self, z_hat: Tensor, z_true: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One-step diffusion on the reconstructed latent: (z0_hat, the aligner's t)."""
        assert self.aligner is not None and self.enhancer is not None
        t = self.aligner(self.aligner_input(z_hat), z_true)
        out = self.backbone.predict(z_hat, unet_timestep(t))
        time = self.backbone.time_convention
        assert time is not None
        return self.enhancer(z_hat, out, t, time), t

    def aligner_input(self, z_hat: Tensor) -> Tensor:
        """z_hat as the aligner reads it (``aligner_latents``): scaled, or divided by the scaling factor."""
        raw = self.aligner_latents == "unscaled" or (self.aligner_latents == "release" and self.training)
        return z_hat / self.backbone.scaling_factor if raw else z_hat

    @property
    def enhance_fn(self) -> pipeline.Enhance | None:
        """The z_hat -> (z0_hat, t) step of stages 2/3 (None in stage 1), in the pipeline's signature."""
        return None if self.stage == "rescaler" else self.enhance

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> TADMModel:
        """Inference speed-ups on a loaded model (``tadm upscale --channels-last --compile``).

        ``channels_last``: NHWC for the backbone's networks. ``compile``: ``torch.compile`` of every network
        an upscale runs but the VAE: the diffusion model (the backbone's), the rescaler's ``upscale``, the
        aligner and the hybrid scheduler. On a GPU at 512 px the small ones are hundreds of kernel launches
        each (the DFRM about 700), as many as the UNet's time in eager mode; compiled they fuse. The VAE
        stays eager: its tiles share GroupNorm statistics through PyTorch's dispatcher
        (:mod:`tadm.inference.groupnorm_sync`), which a compiled graph would bypass. Modules keep their
        types and state-dict keys (``nn.Module.compile``); the rescaler's ``upscale`` becomes a compiled
        method of this instance.
        """
        if compile and self._compiled:
            compile = False  # once is enough (a second torch.compile would wrap the first)
        self.backbone.prepare_inference(channels_last=channels_last, compile=compile)
        if compile:
            self.rescaler.upscale = torch.compile(self.rescaler.upscale)  # type: ignore[method-assign]
            for part in (self.aligner, self.enhancer):
                if part is not None:
                    part.compile()
            self._compiled = True
        return self

    def train(self, mode: bool = True) -> TADMModel:
        super().train(mode)
        if self.stage == "enhancer":  # frozen: its LR image is the exact 8-bit one the enhancer will see
            self.rescaler.eval()
        return self

    # ------------------------------------------------------------------ HR -> LR -> HR
    @torch.no_grad()
    def downscale(self, x: Tensor, tiling: Tiling = NO_TILING) -> Tensor:
        """HR (B, 3, H, W) in [-1, 1] -> the 8-bit LR image in [-1, 1] of ``x`` reflect-padded to a multiple
        of :attr:`pad_multiple` (so (B, 3, ceil(H / m) * m / scale, ...)), as ``tadm downscale`` stores it."""
        y, _, _ = pipeline.downscale(self.backbone, self.rescaler, x.float(), tiling)
        return y

    @torch.no_grad()
    def upscale(
        self,
        y: Tensor,
        size: tuple[int, int] | None = None,
        tiling: Tiling = NO_TILING,
        color_fix: str = "none",
    ) -> Tensor:
        """LR (B, 3, h, w) in [-1, 1] -> HR in [-1, 1] cropped to ``size`` (default: ``scale`` x the LR size).

        ``color_fix`` (``none``, ``wavelet``, ``adain``) corrects the colours towards the LR image's bicubic
        upscale; ``tiling`` bounds memory on large images (:class:`~tadm.inference.tiling.Tiling`).
        """
        if size is None:
            size = (y.shape[-2] * self.scale, y.shape[-1] * self.scale)
        up = pipeline.upscale(
            self.backbone,
            self.rescaler,
            y,
            (int(size[0]), int(size[1])),
            self.enhance_fn,
            tiling,
            color_fix=color_fix,
        )
        return up.image

    @torch.no_grad()
    def round_trip(
        self, x: Tensor, tiling: Tiling = NO_TILING, color_fix: str = "none"
    ) -> pipeline.RoundTrip:
        """HR -> 8-bit LR -> HR in one call: the LR image, the reconstruction cropped to ``x``'s size and the
        enhancer's timestep map (what validation measures and ``tadm evaluate`` scores)."""
        return pipeline.round_trip(
            self.backbone, self.rescaler, x, enhance=self.enhance_fn, tiling=tiling, color_fix=color_fix
        )

    @property
    def pad_multiple(self) -> int:
        """HR sizes are reflect-padded to a multiple of this (the scale and the latent downsampling)."""
        return pipeline.pad_multiple(self.backbone, self.rescaler)
