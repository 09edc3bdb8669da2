"""The WebDataset data module: streaming training crops and whole-image evaluation from tar shards,
from one process to N nodes x M GPUs.

Shards are plain tar files (:mod:`tadm.datamodules.shards`, written by ``tadm shard``); the streams that read
them live in :mod:`tadm.datamodules.shard_streams`. Nothing here talks to other ranks: rank and world size
come from the trainer, which learns them from Lightning's cluster environments (torchrun, SLURM, ...).
Every rank runs the same number of training and evaluation batches, so DDP never hangs on uneven data.

A run is reproducible, and a resumed run continues exactly as the uninterrupted one, mid-epoch too: the
walk of the epoch is re-read up to where the checkpoint stopped (without decoding it) and its rest served
as it would have been, crops included. Resumed on a different number of processes, the rest of the epoch
comes in a fresh order, counted in samples of the whole world, so the epoch still serves its number of
samples (:mod:`tadm.datamodules.elastic`). Corrupt samples are skipped with a warning and counted
(``data/num_skipped`` in the logger), never a crash (:mod:`tadm.datamodules.bad_input`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import lightning as L
import torch

from tadm.datamodules.bad_input import DEFAULT_POLICY, BadInputPolicy, SkipCollector, check_policy
from tadm.datamodules.elastic import ElasticResume, limit_batches
from tadm.datamodules.image_folder import check_crop_size, check_positive
from tadm.datamodules.shard_loader import ShardLoader, eval_collate
from tadm.datamodules.shard_streams import EvalShardStream, LatentSpec, ShardStream, TrainShardStream
from tadm.datamodules.shards import (
    ShardIndexInfo,
    ShardSpec,
    check_shards_exist,
    count_samples,
    expand_shards,
    index_for,
)

SplitName = Literal["train", "val", "test"]

_STAGE_SPLITS: dict[str, tuple[tuple[SplitName, ...], tuple[SplitName, ...]]] = {
    "fit": (("train",), ("val",)),
    "validate": (("val",), ()),
    "test": (("test",), ()),
}


class WebDatasetDataModule(L.LightningDataModule):
    """WebDataset tar shards for fit / validate / test, streaming, on one process or many nodes.

    Data placement needs no collective: every rank reads its own equal share of the samples (training,
    balanced by the counts in ``index.json``; logged at INFO every epoch) or its own range of samples
    (evaluation), and all ranks run the same number of batches. Works unchanged under ``torchrun``
    and SLURM (Lightning's cluster environments give rank and world size). DataLoader workers are started
    per epoch (not persistent), so each epoch's stream is seeded from the trainer's epoch and step.

    Args:
        train_shards: Training shards: a folder holding ``index.json`` (written by ``tadm shard``), a list of
            URLs, a brace pattern (``/data/train/shard-{000000..000099}.tar``), ``pipe:`` commands
            (``pipe:aws s3 cp s3://bucket/shard-000000.tar -``) or fsspec URLs (``s3://``, ``gs://``, with the
            matching fsspec backend installed). Required for ``fit``.
        val_shards: Validation shards (same forms); whole images, evaluated with the same number of batches
            on every rank. Optional for ``fit``, required for ``validate``.
        test_shards: Test shards; required for ``test``.
        crop_size: Side of the square training crop; a positive multiple of ``scale`` and of 8.
        batch_size: Training batch size per rank.
        val_batch_size: Batch size for validation and test (images must then share one size).
        num_workers: DataLoader worker processes per rank; the rank's samples are split between them.
        scale: Downscaling factor of the model (linked from ``model.scale``); constrains ``crop_size``.
        samples_per_epoch: Training samples (crops) per epoch *per rank*, rounded down to whole batches.
            Default: one pass over the shards, ``images x crops_per_image // world size`` (needs the shards'
            ``index.json``).
        shuffle_buffer: Encoded training samples held for shuffling, per worker. Memory is this times the mean
            file size (64 x 3 MB photos = 192 MB per worker; fewer for 8K photos); 1 disables shuffling within
            a pass (shard order is still reshuffled every pass).
        crops_per_image: Training crops cut from each decoded image. Decoding a 2K-8K photo costs far more than
            cropping it; 2-4 raises throughput accordingly, at the price of correlated crops (spread over
            batches by a buffer of ``8 x crops_per_image`` decoded crops per worker).
        flip: Random horizontal flips in training. With cached latents a flip is applied only when the shards
            store the flipped crops' latents too (``tadm shard`` does by default); otherwise flips are off.
        latents: Serve the shards' cached VAE latents (``batch["latent"]``, fp16) so training skips the encoder.
            ``None``: when the index says they exist and were made by the model's backbone at this crop size.
            ``True``: required (an error names what does not match). ``False``: never. Crops are then the
            stored fixed crops (``tadm shard --crops-per-image``), not random ones.
        seed: Base seed; every training stream is seeded with (seed, training batches before the epoch,
            rank, worker): reproducible runs, resumed mid-epoch exactly where they stopped.
        on_bad_image: ``"skip"`` (default, as for ``ImageFolderDataModule``): a corrupt or unusable sample (or
            an unreadable shard) is warned about, left out and counted in ``num_skipped``, also inside
            DataLoader workers, and logged as ``data/num_skipped``. ``"error"``: the first one raises
            (debugging).
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        crop_size: int = 256,
        batch_size: int = 4,
        val_batch_size: int = 1,
        num_workers: int = 0,
        scale: int = 16,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 64,
        crops_per_image: int = 1,
        flip: bool = True,
        latents: bool | None = None,
        seed: int = 0,
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__()
        check_positive(
            scale=scale,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            crops_per_image=crops_per_image,
            shuffle_buffer=shuffle_buffer,
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} must be at least batch_size={batch_size}"
            )
        check_crop_size(crop_size, scale)
        self.save_hyperparameters()
        self.shards: dict[SplitName, ShardSpec | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
        }
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.scale = scale
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.crops_per_image = crops_per_image
        self.flip = flip
        self.latents = latents
        self.seed = seed
        #: set by :meth:`connect`; without it cached latents are served whenever the index has them
        self.model_backbone_id: str | None = None
        self.model_latent_rescaler = True
        self.on_bad_image: BadInputPolicy = check_policy(on_bad_image)
        self.datasets: dict[SplitName, ShardStream] = {}
        self.skips = SkipCollector()
        """Skips reported by the batches of every worker, all epochs (see :mod:`tadm.datamodules.bad_input`)."""
        self._elastic = ElasticResume()
        self._epoch_batches = 0
        self._fresh_rest = False

    # ----------------------------------------------------------------------------------------------------
    # setup

    def _rank_world(self) -> tuple[int, int]:
        """From the trainer (set by Lightning's cluster environment); else the launcher's environment."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists of ``stage`` and build its streams for this rank."""
        rank, world = self._rank_world()
        for split in self._splits_for(stage):
            if split in self.datasets:
                continue
            spec = self.shards[split]
            assert spec is not None
            urls = expand_shards(spec)
            check_shards_exist(urls, split)
            index = index_for(urls)
            if split == "train":
                self.datasets[split] = self._train_stream(urls, index, rank, world)
            else:
                if index is not None:
                    counts = index.counts
                else:
                    warnings.warn(
                        f"no index.json next to the {split} shards: counting their samples (reads them once)",
                        stacklevel=2,
                    )
                    counts = [count_samples(u) for u in urls]
                self.datasets[split] = EvalShardStream(
                    urls, counts, self.val_batch_size, rank, world, split, self.on_bad_image
                )

    def _splits_for(self, stage: str | None) -> list[SplitName]:
        if stage is None:
            splits = [s for s, spec in self.shards.items() if spec is not None]
            if not splits:
                raise ValueError(
                    "WebDatasetDataModule has no shards configured (train_shards, val_shards, ...)"
                )
            return splits
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"WebDatasetDataModule supports stages {sorted(_STAGE_SPLITS)}, not {stage!r}")
        required, optional = _STAGE_SPLITS[stage]
        for split in required:
            if self.shards[split] is None:
                raise ValueError(f"stage '{stage}' needs {split}_shards, which is not set")
        return [*required, *(s for s in optional if self.shards[s] is not None)]

    def _train_stream(
        self, urls: list[str], index: ShardIndexInfo | None, rank: int, world: int
    ) -> TrainShardStream:
        latent = self._latent_spec(index)
        per_rank = self.samples_per_epoch
        if per_rank is None:
            if index is None:
                raise ValueError(
                    "samples_per_epoch is not set and the training shards have no index.json to count them; "
                    "set data.init_args.samples_per_epoch (samples per epoch per rank)"
                )
            crops = self.crops_per_image
            if latent is not None and index.latents is not None:
                crops = min(crops, int(index.latents.get("crops_per_image", crops)))
            per_rank = index.total * crops // world  # one pass: every image's crops once
            if per_rank < self.batch_size:
                raise ValueError(
                    f"{index.total} training images over {world} rank(s) make less than one batch of "
                    f"{self.batch_size} per rank; set samples_per_epoch"
                )
        return TrainShardStream(
            urls,
            crop_size=self.crop_size,
            batch_size=self.batch_size,
            samples_per_epoch=per_rank,
            rank=rank,
            world_size=world,
            crops_per_image=self.crops_per_image,
            flip=self.flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            latent=latent,
            on_bad_image=self.on_bad_image,
            counts=index.counts if index is not None else None,
        )

    def connect(self, backbone_id: str, latent_rescaler: bool) -> None:
        """The model's facts that decide whether cached latents can be served (:class:`ConnectsToModel`):
        its backbone id (latents of another backbone are never served) and whether its rescaler works on
        latents. The tadm CLI calls this; call it yourself when you build the trainer in Python."""
        self.model_backbone_id = backbone_id
        self.model_latent_rescaler = latent_rescaler

    def _latent_spec(self, index: ShardIndexInfo | None) -> LatentSpec | None:
        """Decide once, at setup, whether training serves cached latents (every batch must agree)."""
        if self.latents is False:
            return None
        meta = index.latents if index is not None else None
        wanted_id = self.model_backbone_id
        problem = None
        if meta is None:
            problem = "the training shards' index.json describes no cached latents (`tadm shard --latents`)"
        elif int(meta.get("crop", -1)) != self.crop_size:
            problem = (
                f"the latents were cached for crops of {meta.get('crop')}, not crop_size={self.crop_size}"
            )
        elif wanted_id is not None and meta.get("backbone_id") != wanted_id:
            problem = (
                f"the latents come from backbone {meta.get('backbone_id')!r}, the model uses {wanted_id!r}"
            )
        elif self.latents is None and not self.model_latent_rescaler:
            return None  # a pixel-space rescaler has no use for them
        if problem is not None:
            if self.latents:
                raise ValueError(f"latents: true, but {problem}")
            if meta is not None:
                warnings.warn(f"not using the cached latents: {problem}; encoding on the fly", stacklevel=3)
            return None
        assert meta is not None
        flips = bool(meta.get("flips"))
        if self.flip and not flips:
            warnings.warn(
                "the shards cache latents of unflipped crops only: random flips are off "
                "(`tadm shard` stores flipped latents unless --no-flip-latents)",
                stacklevel=3,
            )
        c, h, w = (int(v) for v in meta["shape"])
        return LatentSpec((c, h, w), flips)

    # ----------------------------------------------------------------------------------------------------
    # dataloaders

    def _position(self) -> tuple[int, int, int]:
        """(epoch, training batches run before it, batches of it run), as a checkpoint restored them before
        the first ``iter``: a resume goes on with the epoch's own walk. Right after a resume on another world,
        the rest of the epoch is a fresh walk (seeded by all the batches run), as its shares changed."""
        trainer = self.trainer
        assert trainer is not None
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        if progress is None:
            return int(trainer.current_epoch), int(trainer.global_step), 0
        total, current = int(progress.total.ready), int(progress.current.ready)
        done = current if 0 < current < self._epoch_batches else 0  # a finished epoch: the next one's start
        if self._fresh_rest:
            self._fresh_rest = False
            return int(trainer.current_epoch), total, 0
        return int(trainer.current_epoch), total - done, done

    def _dataset(self, split: SplitName, stage: str) -> ShardStream:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split} shards loaded: call setup('{stage}') first (Lightning does this for you)"
            )
        return self.datasets[split]

    def train_dataloader(self) -> ShardLoader:
        dataset = self._dataset("train", "fit")
        loader = ShardLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            position=self._position if self.trainer is not None else None,
        )
        trainer, saved = self.trainer, self._elastic.saved
        if trainer is not None:  # a checkpoint's epoch position, in this world's batches
            self._epoch_batches = limit_batches(len(loader), trainer.limit_train_batches)
            world = (int(trainer.world_size), self.batch_size)
            # on another world the rest of the epoch is a fresh walk (_position)
            self._fresh_rest = (
                saved is not None and saved.mid_epoch and (saved.world_size, saved.batch_size) != world
            )
            note = (
                "its remaining samples come in a fresh order over the new shares, which can repeat some it had "
                "served"
            )
            self._elastic.resume(trainer, self.batch_size, self._epoch_batches, note=note)
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training position in world-size-free units (:class:`~tadm.datamodules.elastic.EpochPosition`)."""
        return self._elastic.state_dict(self.trainer, self.batch_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position; ``train_dataloader`` applies it once Lightning has restored its loops."""
        self._elastic.load_state_dict(state_dict)

    def _eval_loader(self, split: SplitName, stage: str) -> ShardLoader:
        return ShardLoader(
            self._dataset(split, stage),
            batch_size=self.val_batch_size,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=eval_collate,
        )

    def val_dataloader(self) -> ShardLoader | list[ShardLoader]:
        if self.shards["val"] is None:
            return []  # nothing to validate during fit
        return self._eval_loader("val", "validate")

    def test_dataloader(self) -> ShardLoader:
        return self._eval_loader("test", "test")

    # ----------------------------------------------------------------------------------------------------
    # skip counting

    @property
    def num_skipped(self) -> int:
        """Samples left out on this rank so far, as reported by the batches (all workers, all epochs)."""
        return self.skips.total

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the workers' skip counters out of the batch and log their total as ``data/num_skipped``."""
        return self.skips.collect(batch, self.trainer)

    def teardown(self, stage: str) -> None:
        self.skips.report(self._rank_world()[0])
