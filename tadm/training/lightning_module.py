"""TADMModule: the LightningModule that trains a :class:`~tadm.model.TADMModel` in its three stages.

The model itself (its parts, ``downscale`` / ``upscale``, the one-step enhancement, which tensors each stage
trains, loading) is the plain ``nn.Module`` in :mod:`tadm.model`; this wrapper owns only training: losses,
optimisers and schedules, validation metrics and images, the EMA (as a callback, :mod:`~tadm.training.
ema_callback`), and the checkpoint format. Building it is cheap: the frozen backbone and ``init_from`` load
in :meth:`TADMModule.configure_model`, when a trainer runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from tadm.contracts import DiffusionBackbone, Rescaler, TimestepAligner
from tadm.errors import TrainingDiverged
from tadm.evaluation.metrics import psnr_rgb, psnr_y, ssim_y
from tadm.evaluation.perceptual import PerceptualLoss
from tadm.inference import pipeline
from tadm.inference.heatmap import timestep_panel
from tadm.inference.tiling import NO_TILING, Tiling
from tadm.model.checkpoints import EMA_KEY, META_KEY
from tadm.model.ema import TrainedEMA, check_ema_args
from tadm.model.enhancer import HybridScheduler
from tadm.model.tadm_model import AlignerLatents, Stage, TADMModel
from tadm.ops.color_fix import ColorFix, check_color_fix
from tadm.ops.images import bicubic_down, crop_to, pad_to_multiple, to_unit
from tadm.training.callbacks import newest_saved_checkpoint
from tadm.training.checkpoint_io import AtomicCheckpoints
from tadm.training.ema_callback import EMAWeights
from tadm.training.losses import (
    DEFAULT_STAGE1_WEIGHTS,
    DEFAULT_STAGE2_WEIGHTS,
    DistanceName,
    get_distance,
    weighted_sum,
)
from tadm.training.nonfinite import NonFiniteGuard, describe_non_finite, non_finite_tensors
from tadm.training.preemption import SaveOnSigterm
from tadm.training.schedules import WarmupCosineLR

log = logging.getLogger(__name__)

#: the prefix of the model's tensors in this module's state dict; checkpoints store them without it
MODEL_PREFIX = "model."
#: the checkpoint entry holding the non-finite step counts (a resumed run continues them)
NONFINITE_KEY = "tadm_nonfinite_steps"


def _last_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint this run saved (each was checked finite before it was written), or a note."""
    return newest_saved_checkpoint(trainer) or "none saved by this run"


@contextmanager
def _cpu_fp32() -> Iterator[None]:
    """Build on the CPU in float32, as the backbone always loaded (in ``__init__`` before): Lightning runs
    ``configure_model`` inside its device and precision contexts (``bf16-true`` makes bf16 the default
    dtype, which would run the text encoder for the empty-prompt embedding in bf16); the strategy and the
    precision plugin move and cast the module afterwards, as they always did."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


class TADMModule(L.LightningModule):
    """TADM's three training stages on one :class:`~tadm.model.TADMModel` (``self.model``).

    ``rescaler`` (stage 1) trains the rescaler alone; ``enhancer`` (stage 2) freezes it and trains
    the one-step diffusion enhancer (UNet LoRA + conv_in, VAE-decoder LoRA, aligner, Refiner);
    ``joint`` (stage 3) trains everything with both stages' losses. The model's arguments and the
    training ones share one flat ``model:`` section in YAML.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        rescaler: Rescaler,
        stage: Stage = "rescaler",
        scale: int = 16,
        aligner: TimestepAligner | None = None,
        enhancer: HybridScheduler | None = None,
        loss_weights: dict[str, float] | None = None,
        distance: DistanceName = "mse",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        init_from: str | None = None,
        num_log_images: int = 4,
        eval_tiling: Tiling | None = None,
        aligner_latents: AlignerLatents = "scaled",
        color_fix: ColorFix = "none",
        ema_decay: float | None = None,
        ema_start_step: int = 0,
        max_nonfinite_steps: int = 3,
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
            loss_weights: weight per named loss term. Defaults: stage 1 ``{lr: 3, latent_forward: 1,
                latent_backward: 1}`` (the release); stage 2 ``{pixel: 2, lpips: 5, dists: 5}``; stage 3
                both. A term with weight 0 is not computed.
            distance: ``mse`` (default, the release) or ``l1`` (the paper's latent terms).
            optimizer: optimizer factory; default AdamW(lr 1e-4, betas (0.9, 0.999), weight decay 1e-2).
            lr_scheduler: LR scheduler factory, e.g. ``tadm.training.schedules.WarmupCosineLR`` (its ``total_steps``
                defaults to the trainer's run length); none (constant LR) by default.
            lr_scheduler_interval: step the scheduler every optimiser ``step`` or every ``epoch``.
            init_from: a previous stage's checkpoint whose weights initialise this run (weights only;
                use ``--ckpt_path`` to resume a run exactly).
            num_log_images: validation images logged to TensorBoard as HR | LR (nearest) | reconstruction
                (| timestep heat map in stages 2/3, on the aligner's t range).
            eval_tiling: tile validation/test/predict images as inference does (default: whole images;
                set it to see per-tile timesteps in the heat maps of large validation images).
            aligner_latents: the z_hat the aligner reads. ``scaled`` (tadm: the latent every other part
                sees); ``unscaled``: z_hat / the backbone's scaling factor, as the release's training code
                feeds its TPM (``src/tadm.py``); ``release``: unscaled in training mode, scaled in eval mode,
                as the release's training and its inference script (``src/tadm_tile.py``, what
                ``run_inference.sh`` runs) do. The UNet, the Refiner and the x0 formula always get it scaled.
            color_fix: colour correction of the validation/test/predict reconstructions towards the bicubic
                upscale of their LR images: ``none`` (default, as the paper), ``wavelet`` or ``adain``
                (:mod:`tadm.ops.color_fix`). Inference commands take ``--color-fix`` instead.
            ema_decay: keep an exponential moving average of the trained tensors with this decay (e.g.
                0.999; default null: none, as the paper). Updated after every optimiser step, warmed up
                (update ``u`` uses ``min(ema_decay, (u - s) / (9 + u - s))``, see :mod:`tadm.model.ema`),
                stored in checkpoints, used by validation/test/predict, and by ``tadm export`` and the codec
                unless they are given ``--weights raw``.
            ema_start_step: EMA updates (optimiser steps) that only copy the weights before averaging
                begins (``s`` above; default 0).
            max_nonfinite_steps: an optimiser step whose loss or gradients are not finite (NaN, inf) on any
                rank is skipped on every rank (logged as ``train/skipped_steps``; the weights and the EMA stay
                as they were); after this many in a row the run stops with one line naming the step, the
                non-finite loss terms and the last checkpoint with finite weights (exit status 1). Under fp16
                the grad scaler's own overflow skips are not counted.
        """
        super().__init__()
        check_color_fix(color_fix)
        check_ema_args(ema_decay, ema_start_step)
        self.save_hyperparameters(
            ignore=["backbone", "rescaler", "aligner", "enhancer", "optimizer", "lr_scheduler", "eval_tiling"]
        )
        self.model = TADMModel(backbone, rescaler, stage, scale, aligner, enhancer, aligner_latents)
        if loss_weights is None:
            loss_weights = {
                "rescaler": DEFAULT_STAGE1_WEIGHTS,
                "enhancer": DEFAULT_STAGE2_WEIGHTS,
                "joint": {**DEFAULT_STAGE1_WEIGHTS, **DEFAULT_STAGE2_WEIGHTS},
            }[stage]
        self.loss_weights = dict(loss_weights)
        self.distance = get_distance(distance)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.init_from = init_from
        self.num_log_images = num_log_images
        self.eval_tiling = eval_tiling
        self.color_fix = color_fix
        self.ema_decay = ema_decay
        self.ema_start_step = ema_start_step
        #: the EMA of the trained tensors while fitting (or loaded to evaluate a checkpoint that has one);
        #: its lifecycle is :class:`~tadm.training.ema_callback.EMAWeights`
        self.ema: TrainedEMA | None = None
        self._ema_pending: dict[str, Any] | None = None  # from on_load_checkpoint, before the EMA exists
        #: the run's full config (YAML), set by the CLI and stored in every checkpoint
        self.run_config: str | None = None
        self.strict_loading = False  # frozen backbone weights are not stored; checked in on_load_checkpoint
        self.perceptual: PerceptualLoss | None = None
        w = self.loss_weights
        if stage != "rescaler" and (w.get("lpips", 0) or w.get("dists", 0)):
            self.perceptual = PerceptualLoss(w.get("lpips", 0.0), w.get("dists", 0.0))
        self._configured = False
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)

    def configure_model(self) -> None:
        """Load the frozen backbone parts the stage needs, then ``init_from``'s weights (once per module:
        Lightning calls this before every fit / validate / test / predict, before restoring ``--ckpt_path``)."""
        if self._configured:
            return
        with _cpu_fp32():
            self.model.load_parts()
            if self.init_from:
                self.model.load_weights(self.init_from)
        self._configured = True

    # the model's parts, as callbacks, the CLI and the data links reach them
    @property
    def backbone(self) -> DiffusionBackbone:
        return self.model.backbone

    @property
    def rescaler(self) -> Rescaler:
        return self.model.rescaler

    @property
    def aligner(self) -> TimestepAligner | None:
        return self.model.aligner

    @property
    def enhancer(self) -> HybridScheduler | None:
        return self.model.enhancer

    @property
    def stage(self) -> str:
        return self.model.stage

    @property
    def scale(self) -> int:
        return self.model.scale

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser gets: the model's trainable set for this stage."""
        return self.model.trainable_parameters()

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """:meth:`trainable_parameters` named as checkpoints and the EMA store them (``rescaler.*``, ...)."""
        return self.model.named_trainable_parameters()

    # ------------------------------------------------------------------ training
    def _latent(self, batch: dict[str, Any]) -> Tensor | None:
        if self.rescaler.space != "latent":
            return None
        if "latent" in batch:  # precomputed by the data pipeline
            return batch["latent"].float()
        with torch.no_grad():
            return self.backbone.encode(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        z = self._latent(batch)
        w = self.loss_weights
        terms: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        if self.stage != "enhancer":
            terms.update(self.rescaler.training_losses(x, z, self.distance, outputs=outputs))
        if self.stage != "rescaler":
            if self.stage == "enhancer":
                with torch.no_grad():
                    z_hat = self.rescaler.upscale(self.rescaler.downscale(x, z))
            elif "z_hat" in outputs:  # joint: the rescaler's own backward reconstruction, computed once
                z_hat = outputs["z_hat"]
            else:
                z_hat = self.rescaler.upscale(self.rescaler.downscale(x, z))
            if self.rescaler.space == "pixel":  # pixel rescaling + SD prior: the VAE encodes its image
                with torch.set_grad_enabled(self.stage == "joint"):  # joint: gradients reach the rescaler
                    z_hat = self.backbone.encode(z_hat.clamp(-1.0, 1.0))
            z0, t = self.model.enhance(z_hat, z)
            x_hat = self.backbone.decode(z0)
            if w.get("pixel", 0):
                terms["pixel"] = self.distance(x_hat, x)
            if self.perceptual is not None:
                terms.update(self.perceptual(x_hat, x))
            self.log("train/t_mean", t.detach().float().mean(), batch_size=x.shape[0])
        loss = weighted_sum(terms, self.loss_weights)
        self.nonfinite.note_loss(terms, loss)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a step whose loss or gradients are not finite on any rank; stop after too many in a row.

        Runs after backward (and after the AMP scaler's unscale), before gradient clipping and the update:
        the skip drops the gradients (``set_to_none``: the optimiser leaves those parameters and their
        moments alone); the LR scheduler still counts the step."""
        guard = self.nonfinite
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        ok = guard.check_step(
            self.trainable_parameters(),
            lambda mine: self.trainer.strategy.reduce_boolean_decision(mine, all=True),
            check_gradients=scaler is None,
        )
        self.log("train/skipped_steps", float(guard.total), batch_size=1)
        if ok:
            guard.end_step()
            return
        terms = ", ".join(guard.bad_terms()) or "loss (on another rank)"
        guard.end_step()
        optimizer.zero_grad(set_to_none=True)
        step = self.trainer.global_step + 1  # the step being taken (global_step counts those done)
        if guard.must_stop:
            raise TrainingDiverged(
                f"training diverged: {guard.in_a_row} optimiser steps in a row up to step {step} had a non-finite "
                f"{terms} and were skipped ({guard.total} in all); stopped. The last checkpoint with finite "
                f"weights: {_last_checkpoint(self.trainer)}"
            )
        if self.trainer.is_global_zero:  # one plain line, on the tadm logger (the CLI shows it on stderr)
            log.warning(
                f"step {step}: non-finite {terms}: step skipped ({guard.in_a_row} in a row; the run stops at "
                f"{guard.max_in_a_row}, model.max_nonfinite_steps)"
            )

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
        if isinstance(sched, WarmupCosineLR) and sched.total_steps is None:
            sched.follow_run_length(int(self.trainer.estimated_stepping_batches))
        elif hasattr(sched, "total_steps") and sched.total_steps is None:  # a user's schedule of this shape
            sched.total_steps = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": self.lr_scheduler_interval},
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """What every trainer of this module needs, a user's own ``Trainer`` included: the EMA's lifecycle
        (a no-op without ``ema_decay``), which also puts the raw weights back if a run stops mid-evaluation;
        a resumable checkpoint when a scheduler sends SIGTERM; checkpoint saves that a full disk or a kill
        cannot corrupt (a temporary file in the checkpoint's folder, fsynced, then renamed)."""
        return [EMAWeights(), SaveOnSigterm(), AtomicCheckpoints()]

    # ---------------------------------------------------------------- evaluation
    def evaluate_batch(self, x: Tensor) -> dict[str, Tensor]:
        """Round trip HR -> 8-bit LR -> HR and per-image metrics, with the bicubic baseline."""
        rt = self.model.round_trip(x, self.eval_tiling or NO_TILING, self.color_fix)
        base = pipeline.bicubic_round_trip(x, self.scale)
        xp, _ = pad_to_multiple(x, self.model.pad_multiple)
        out = {
            "psnr_y": psnr_y(rt.reconstruction, x),
            "ssim_y": ssim_y(rt.reconstruction, x),
            "lr_psnr": psnr_rgb(rt.lr, bicubic_down(xp, self.scale)),
            "bicubic_psnr_y": psnr_y(base, x),
            "bicubic_ssim_y": ssim_y(base, x),
            "_lr": rt.lr,
            "_reconstruction": rt.reconstruction,
        }
        if rt.timesteps is not None:
            out["t_mean"] = rt.timesteps.mean(dim=(1, 2, 3))
            out["_timesteps"] = rt.timesteps
        return out

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        x = batch["image"]
        out = self.evaluate_batch(x)
        for name, value in out.items():
            if not name.startswith("_"):
                self.log(f"{prefix}/{name}", value.mean(), batch_size=x.shape[0], sync_dist=True)
        if batch_idx < self.num_log_images:
            self._log_images(prefix, batch_idx, x, out["_lr"], out["_reconstruction"], out.get("_timesteps"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """LR image and reconstruction per input (files are written by ``tadm downscale/upscale``)."""
        x = batch["image"]
        rt = self.model.round_trip(x, self.eval_tiling or NO_TILING, self.color_fix)
        return {
            "path": batch.get("path"),
            "lr": rt.lr,
            "reconstruction": rt.reconstruction,
            "timesteps": rt.timesteps,
        }

    def _log_images(
        self, prefix: str, idx: int, x: Tensor, lr: Tensor, rec: Tensor, timesteps: Tensor | None = None
    ) -> None:
        """HR | LR (nearest) | reconstruction, and in stages 2/3 the timestep heat map beside them."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        import torchvision

        size = x.shape[-2:]
        lr_up = crop_to(F.interpolate(lr, scale_factor=self.scale, mode="nearest"), size)
        panels = [to_unit(x[:1]), to_unit(lr_up[:1]), to_unit(rec[:1])]
        if timesteps is not None:
            assert self.aligner is not None
            f = self.backbone.downsample_factor
            panels.append(timestep_panel(timesteps[:1], f, size, self.aligner.t_min, self.aligner.t_max))
            self.logger.experiment.add_histogram(
                f"{prefix}/timesteps/{idx}", timesteps[:1].cpu(), self.global_step
            )
        grid = torchvision.utils.make_grid(torch.cat(panels), nrow=len(panels))
        self.logger.experiment.add_image(f"{prefix}/hr_lr_reconstruction/{idx}", grid.cpu(), self.global_step)

    # --------------------------------------------------------------- checkpoints
    def _frozen_keys(self) -> set[str]:
        """State-dict keys (of this module) not stored in checkpoints: the frozen backbone and loss networks."""
        keys = {MODEL_PREFIX + k for k in self.model.frozen_keys()}
        if self.perceptual is not None:  # frozen loss networks come from their own packages
            keys |= {f"perceptual.{k}" for k in self.perceptual.state_dict()}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model's trained tensors under the model's own names (``rescaler.*``, ``backbone.*``
        LoRA, ...: the keys an export and :meth:`TADMModel.load_trained_state` use), never frozen ones."""
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {
            k.removeprefix(MODEL_PREFIX): v
            for k, v in checkpoint["state_dict"].items()
            if k not in frozen and k.startswith(MODEL_PREFIX)
        }
        if self.ema is not None:  # the raw weights stay "state_dict" even if saved during validation
            checkpoint["state_dict"].update(self.ema.raw_weights())
            checkpoint[EMA_KEY] = self.ema.state_dict()
        checkpoint[META_KEY] = self.model.checkpoint_meta(self.run_config)
        checkpoint[NONFINITE_KEY] = self.nonfinite.state_dict()
        bad = non_finite_tensors(checkpoint["state_dict"])
        if self.ema is not None:
            bad += non_finite_tensors({f"ema.{k}": v for k, v in checkpoint[EMA_KEY]["weights"].items()})
        if bad:  # every rank holds the same weights under DDP: all raise here together
            raise TrainingDiverged(
                f"refusing to save a checkpoint at step {self.global_step}: {describe_non_finite(bad)}. The last "
                f"checkpoint with finite weights: {_last_checkpoint(self.trainer)}"
            )

    def check_compatible(self, meta: dict[str, Any] | None, source: str) -> None:
        """Refuse a checkpoint trained on another backbone or at another scale (:mod:`tadm.model.trained_state`)."""
        self.model.check_compatible(meta, source)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_compatible(checkpoint.get(META_KEY), "being resumed")
        self.nonfinite.load_state_dict(checkpoint.get(NONFINITE_KEY, {}))
        if EMA_KEY in checkpoint and self.ema is not None:  # strategies that restore after on_fit_start
            self.ema.load_state_dict(checkpoint[EMA_KEY], "the checkpoint being resumed")
        elif EMA_KEY in checkpoint:  # loaded once the EMA exists (on_fit_start, or to evaluate)
            self._ema_pending = checkpoint[EMA_KEY]
        stored = {MODEL_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
        missing = sorted(set(self.state_dict()) - self._frozen_keys() - set(stored))
        if missing:
            names = [k.removeprefix(MODEL_PREFIX) for k in missing]
            raise KeyError(f"checkpoint lacks trained weights: {names[:8]}{' ...' if len(names) > 8 else ''}")
        checkpoint["state_dict"] = stored  # what Lightning loads next, into this module
