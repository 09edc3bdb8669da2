"""TADMModule: the one LightningModule; ``stage`` picks trainable parts and losses."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from components.backbones.base import DiffusionBackbone
from components.rescalers.base import Rescaler
from components.rescalers.bicubic import Bicubic
from tadm import pipeline
from tadm.imageops import bicubic_down, crop_to, pad_to_multiple, to_unit
from tadm.losses import DEFAULT_STAGE1_WEIGHTS, DistanceName, get_distance, weighted_sum
from tadm.metrics import psnr_rgb, psnr_y, ssim_y

log = logging.getLogger(__name__)

Stage = Literal["rescaler", "enhancer", "joint"]
CKPT_KEY = "tadm"


class TADMModule(L.LightningModule):
    """Trains and evaluates a rescaler (stage 1) on top of a frozen diffusion backbone."""

    def __init__(
        self,
        backbone: DiffusionBackbone,
        rescaler: Rescaler,
        stage: Stage = "rescaler",
        scale: int = 16,
        loss_weights: dict[str, float] | None = None,
        distance: DistanceName = "mse",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        init_from: str | None = None,
        num_log_images: int = 4,
    ) -> None:
        """
        Args:
            backbone: the diffusion backbone (VAE, and for later stages UNet and text prior).
            rescaler: the rescaler plug-in (e.g. ``dfrm`` or ``bicubic``).
            stage: ``rescaler`` trains the rescaler alone (stage 1). ``enhancer`` and ``joint``
                are not implemented yet.
            scale: HR -> LR factor, linked into the rescaler and the data module by the CLI.
            loss_weights: weight per named loss term; defaults to the release's stage-1 weights
                ``{lr: 3, latent_forward: 1, latent_backward: 1}``.
            distance: ``mse`` (default, the release) or ``l1`` (the paper's latent terms).
            optimizer: optimizer factory; default AdamW(lr 1e-4, betas (0.9, 0.999), weight decay 1e-2).
            lr_scheduler: LR scheduler factory, e.g. ``tadm.schedules.WarmupCosineLR`` (its ``total_steps``
                defaults to the trainer's run length); none (constant LR) by default.
            lr_scheduler_interval: step the scheduler every optimiser ``step`` or every ``epoch``.
            init_from: a previous stage's checkpoint whose weights initialise this run (weights only;
                use ``--ckpt_path`` to resume a run exactly).
            num_log_images: validation images logged to TensorBoard as HR | LR (nearest) | reconstruction.
        """
        super().__init__()
        if stage != "rescaler":
            raise NotImplementedError(
                f"stage {stage!r} is not implemented yet; only stage 'rescaler' (stage 1) is available"
            )
        if rescaler.scale != scale:
            raise ValueError(f"rescaler scale {rescaler.scale} differs from model scale {scale}")
        self.save_hyperparameters(ignore=["backbone", "rescaler", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.rescaler = rescaler
        self.stage = stage
        self.scale = scale
        self.loss_weights = dict(DEFAULT_STAGE1_WEIGHTS if loss_weights is None else loss_weights)
        self.distance = get_distance(distance)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.num_log_images = num_log_images
        self.baseline = Bicubic(scale)
        #: the run's full config (YAML), set by the CLI and stored in every checkpoint
        self.run_config: str | None = None
        self.strict_loading = False  # frozen backbone weights are not stored; checked in on_load_checkpoint

        backbone.load_for_stage(stage)
        self._check_latent_layout()
        backbone.requires_grad_(False)
        rescaler.requires_grad_(True)
        if init_from:
            self.load_weights(init_from)

    def _check_latent_layout(self) -> None:
        want = getattr(self.rescaler, "latent_channels", None)
        if self.rescaler.space == "latent" and want is not None and want != self.backbone.latent_channels:
            raise ValueError(
                f"rescaler expects {want} latent channels but backbone {self.backbone.backbone_id} "
                f"produces {self.backbone.latent_channels}"
            )

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.rescaler.parameters() if p.requires_grad]
        params += self.backbone.trainable_parameters(self.stage)
        return params

    def _latent(self, batch: dict[str, Any]) -> Tensor | None:
        if self.rescaler.space != "latent":
            return None
        if "latent" in batch:  # precomputed by the data pipeline
            return batch["latent"].float()
        with torch.no_grad():
            return self.backbone.encode(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        terms = self.rescaler.training_losses(x, self._latent(batch), self.distance)
        loss = weighted_sum(terms, self.loss_weights)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=bs)
        return loss

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"stage {self.stage!r} has no trainable parameters with this rescaler/backbone")
        if self.optimizer_factory is None:
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
        else:
            opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(opt)
        if hasattr(sched, "total_steps") and sched.total_steps is None:
            sched.total_steps = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": self.lr_scheduler_interval},
        }

    # ---------------------------------------------------------------- evaluation
    def evaluate_batch(self, x: Tensor) -> dict[str, Tensor]:
        """Round trip HR -> 8-bit LR -> HR and per-image metrics, with the bicubic baseline."""
        rt = pipeline.round_trip(self.backbone, self.rescaler, x)
        base = pipeline.round_trip(self.backbone, self.baseline, x)
        xp, _ = pad_to_multiple(x, pipeline.pad_multiple(self.backbone, self.rescaler))
        return {
            "psnr_y": psnr_y(rt.reconstruction, x),
            "ssim_y": ssim_y(rt.reconstruction, x),
            "lr_psnr": psnr_rgb(rt.lr, bicubic_down(xp, self.scale)),
            "bicubic_psnr_y": psnr_y(base.reconstruction, x),
            "bicubic_ssim_y": ssim_y(base.reconstruction, x),
            "_lr": rt.lr,
            "_reconstruction": rt.reconstruction,
        }

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        x = batch["image"]
        out = self.evaluate_batch(x)
        for name, value in out.items():
            if not name.startswith("_"):
                self.log(f"{prefix}/{name}", value.mean(), batch_size=x.shape[0], sync_dist=True)
        if batch_idx < self.num_log_images:
            self._log_images(prefix, batch_idx, x, out["_lr"], out["_reconstruction"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """LR image and reconstruction per input (files are written by ``tadm downscale/upscale``)."""
        rt = pipeline.round_trip(self.backbone, self.rescaler, batch["image"])
        return {"path": batch.get("path"), "lr": rt.lr, "reconstruction": rt.reconstruction}

    def _log_images(self, prefix: str, idx: int, x: Tensor, lr: Tensor, rec: Tensor) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        import torchvision

        lr_up = crop_to(F.interpolate(lr, scale_factor=self.scale, mode="nearest"), x.shape[-2:])
        grid = torchvision.utils.make_grid(
            torch.cat([to_unit(x[:1]), to_unit(lr_up[:1]), to_unit(rec[:1])]), nrow=3
        )
        self.logger.experiment.add_image(f"{prefix}/hr_lr_reconstruction/{idx}", grid.cpu(), self.global_step)

    # --------------------------------------------------------------- checkpoints
    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the frozen backbone (not stored: they come from its own weights)."""
        trainable = {id(p) for p in self.backbone.trainable_parameters(self.stage)}
        keys = set()
        for name, p in self.backbone.named_parameters():
            if id(p) not in trainable:
                keys.add(f"backbone.{name}")
        keys |= {f"backbone.{name}" for name, _ in self.backbone.named_buffers()}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint[CKPT_KEY] = {
            "backbone_id": self.backbone.backbone_id,
            "rescaler": f"{type(self.rescaler).__module__}.{type(self.rescaler).__qualname__}",
            "stage": self.stage,
            "scale": self.scale,
            "config": self.run_config,
        }

    def _check_compatible(self, meta: dict[str, Any] | None, source: str) -> None:
        if not meta:
            return
        if meta.get("backbone_id") != self.backbone.backbone_id:
            raise ValueError(
                f"checkpoint {source} was trained with backbone {meta.get('backbone_id')!r}, "
                f"but this model uses {self.backbone.backbone_id!r}; use the same backbone config"
            )
        if meta.get("scale") not in (None, self.scale):
            raise ValueError(
                f"checkpoint {source} is for scale x{meta['scale']}, this model is x{self.scale}"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_compatible(checkpoint.get(CKPT_KEY), "being resumed")
        missing = sorted(set(self.state_dict()) - self._frozen_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"checkpoint lacks trained weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            )

    def load_weights(self, path: str) -> None:
        """Weights-only initialisation from another run's checkpoint (``init_from``)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"init_from checkpoint not found: {path}") from None
        self._check_compatible(ckpt.get(CKPT_KEY), path)
        state = ckpt.get("state_dict", ckpt)
        result = self.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise KeyError(f"{path} has weights this model does not: {unexpected[:8]}")
        missing = sorted(set(result.missing_keys) - self._frozen_keys())
        if missing:
            log.warning(
                "init_from %s: %d trainable tensors not in the checkpoint keep their initial values: %s",
                path,
                len(missing),
                missing[:8],
            )
