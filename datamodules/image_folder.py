"""Image-folder data: random crops for training, whole images for validation, test and prediction.

Meant for small sets (DIV2K, Kodak, a folder of your own photos); streaming at scale lives in the
WebDataset datamodule. Unreadable files follow the policy both data modules share
(:mod:`tadm.datamodules.bad_input`): ``on_bad_image="skip"`` (the default) warns, leaves the file out and
counts it, also when it fails inside a DataLoader worker; ``"error"`` stops at the first one.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from tadm.datamodules.bad_input import (
    DEFAULT_POLICY,
    BadInputPolicy,
    SkipCollector,
    SkipCounter,
    check_policy,
)
from tadm.datamodules.elastic import (
    ElasticResume,
    EpochSampler,
    ResumableLoader,
    current_epoch,
    limit_batches,
    sample_generator,
)
from tadm.datamodules.image_io import ImageReadError, image_size, list_images, load_image
from tadm.datamodules.image_transforms import CropAugment, random_crop_flip

Split = Literal["train", "val", "test", "predict"]

_STAGE_SPLITS: dict[str, tuple[tuple[Split, ...], tuple[Split, ...]]] = {
    # stage: (required splits, optional splits)
    "fit": (("train",), ("val",)),
    "validate": (("val",), ()),
    "test": (("test",), ()),
    "predict": (("predict",), ()),
}
_ALL_SPLITS: tuple[Split, ...] = ("train", "val", "test", "predict")


class ImageFolderDataset(Dataset[dict[str, Any]]):
    """Images from a list of files, as ``{"image": (3, h, w) float in [-1, 1], "path": str}``.

    Args:
        files: Image files; decoded lazily in ``__getitem__``.
        mode: ``"train"``: random ``crop_size`` square crop plus random horizontal flip; images smaller
            than the crop are mirror-padded first (:func:`reflect_pad`). ``"eval"``: the whole image,
            unpadded (the model pipeline pads to the multiple it needs and crops back).
        crop_size: Side of the training crop (ignored in eval mode).
        on_bad_image: A file that fails to decode is warned about, counted in ``num_skipped`` and replaced by
            the next readable file (``"skip"``), or raises :class:`ImageReadError` (``"error"``).
        repeats: The file list is served this many times per epoch (tiny folders make tiny epochs).
        cache_images: Keep every decoded image in memory after its first use. Decoding a 2K photo costs
            tens of milliseconds, which dominates small-model steps on a CPU; only for folders that fit
            in RAM (each DataLoader worker holds its own cache).
        name: Names this dataset's skip counters (the split), so one collector can tell them apart.
        augment: In training, what happens to each crop after cropping and flipping (:class:`CropAugment`:
            shuffled channels, synthetic smooth fields, faint crops); nothing by default.

    Randomness comes from torch's global RNG, so ``seed_everything`` plus Lightning's worker seeding make
    crops and flips reproducible (the order is the data module's sampler's); an index that carries its
    epoch's order seed (:class:`~tadm.datamodules.elastic.SampleIndex`, what the data module's sampler
    serves) draws from a generator of its own instead, so each sample's crop depends only on the epoch and
    the sample, not on what ran before (a resumed run crops as the uninterrupted one). ``num_skipped``
    counts per process (DataLoader workers count their own); every sample carries its process's running count to the
    data module (``SkipCounter.tag``).
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        mode: Literal["train", "eval"] = "eval",
        crop_size: int = 256,
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
        repeats: int = 1,
        cache_images: bool = False,
        name: str = "images",
        augment: CropAugment | None = None,
    ) -> None:
        if not files:
            raise ValueError("ImageFolderDataset needs at least one file")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if mode == "train" and crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.files = [Path(f) for f in files]
        self.mode = mode
        self.crop_size = crop_size
        self.on_bad_image: BadInputPolicy = check_policy(on_bad_image)
        self.repeats = repeats
        self.name = name
        self._skips = SkipCounter(f"{name}/main", self.on_bad_image)
        self._bad: set[int] = set()
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}
        self.augment = augment or CropAugment()

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    @property
    def num_skipped(self) -> int:
        """Files this process failed to decode and left out (a DataLoader worker counts its own)."""
        return self._counter().count

    def _counter(self) -> SkipCounter:
        """This process's counter: a DataLoader worker starts its own, named by the worker's id and seed.

        The seed tells apart the workers of successive loaders (a worker's copy of the dataset counts from
        zero, so reusing a name would hide its skips behind an earlier worker's count).
        """
        if self._skips.pid != os.getpid():
            info = get_worker_info()
            where = f"w{info.id}/{info.seed}" if info is not None else f"pid{os.getpid()}"
            self._skips = SkipCounter(f"{self.name}/{where}", self.on_bad_image)
        return self._skips

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        n = len(self.files)
        start = index % n
        for offset in range(n):
            i = (start + offset) % n
            if i in self._bad:
                continue
            image = self._load(i)
            if image is not None:
                sample = {
                    "image": self._transform(image, sample_generator(index)),
                    "path": str(self.files[i]),
                }
                return self._counter().tag(sample)
        raise ImageReadError(
            f"none of the {n} images in this dataset could be read (first: '{self.files[0]}')"
        )

    def _load(self, i: int) -> torch.Tensor | None:
        """Decode file ``i``; in skip mode a failure warns, is counted and returns None."""
        if i in self._cache:
            return self._cache[i]
        try:
            image = load_image(self.files[i])
            if self.cache_images:
                self._cache[i] = image
            return image
        except ImageReadError as exc:
            self._counter().skip(exc)  # raises under on_bad_image="error"
            self._bad.add(i)
            return None

    def _transform(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.mode == "eval":
            return image
        return self.augment(random_crop_flip(image, self.crop_size, generator), generator)


class ImageFolderDataModule(L.LightningDataModule):
    """Folders of images for fit / validate / test / predict.

    Every file's header is checked in :meth:`setup`, so an unreadable file fails (or is reported and
    skipped) before training starts rather than hours in. A file that passes the header check but fails to
    decode is skipped (or fails) when it is read, in the main process or a DataLoader worker; both kinds of
    skip add up in ``num_skipped``, logged as ``data/num_skipped``.

    Evaluation batches hold whole images, which can only be stacked when they share a size: if a folder's
    images differ in size, its eval dataloader uses batch size 1 (with a warning) instead of
    ``val_batch_size``.

    Each training epoch is one permutation of the training files, split between the ranks
    (:class:`~tadm.datamodules.elastic.EpochSampler`: Lightning's ``DistributedSampler`` order, seeded with
    ``seed_everything``'s seed + the epoch, on any number of processes), and each sample's crop, flip and
    colour augmentation is drawn from a generator seeded by the epoch's order and the sample. Checkpoints
    record the position in the order, so a run resumed mid-epoch serves the rest of the epoch and none of it
    twice, also on a different number of processes (with a warning that the order changes;
    :mod:`tadm.datamodules.elastic`); on the same number it serves the very batches, crops included, of the
    uninterrupted run.

    Args:
        train_dir: Folder (searched recursively) of training images; required for ``fit``.
        val_dir: Folder of validation images; optional for ``fit``, required for ``validate``.
        test_dir: Folder of test images; required for ``test``.
        predict_dir: Folder of images to rescale; required for ``predict``.
        crop_size: Side of the square training crop; a positive multiple of ``scale`` and of 8, so the
            low-resolution crop has whole pixels.
        batch_size: Training batch size.
        val_batch_size: Batch size for validation, test and predict; only used when all images of that
            folder have the same size (otherwise 1).
        num_workers: DataLoader worker processes (0 decodes in the main process).
        scale: Downscaling factor of the model (16 or 32 for extreme rescaling); constrains ``crop_size``.
        train_repeats: Serve the training files this many times per epoch, so a tiny folder still makes a
            useful epoch.
        on_bad_image: ``"skip"`` (default, as for ``WebDatasetDataModule``): each unreadable image is warned
            about, left out and counted in ``num_skipped``. ``"error"``: the first one raises
            ``ImageReadError`` naming it.
        cache_images: Keep decoded training images in memory (small folders only; see ImageFolderDataset).
        color_augment: Shuffle the RGB channels of each training crop at random: for small or
            colour-narrow training sets.
        smooth_fraction: Share of training crops replaced by smooth synthetic colour fields.
        low_contrast_fraction: Share of the photo crops whose contrast is cut to between
            ``low_contrast_min`` and 1/2: faint misty, dusky and night detail.
        low_contrast_min: The smallest of those contrast factors (log-uniform up to 1/2). The last four
            make the training crops' :class:`~tadm.datamodules.image_transforms.CropAugment`, which says
            why each helps.
    """

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        crop_size: int = 256,
        batch_size: int = 4,
        val_batch_size: int = 1,
        num_workers: int = 0,
        scale: int = 16,
        train_repeats: int = 1,
        on_bad_image: BadInputPolicy = DEFAULT_POLICY,
        cache_images: bool = False,
        color_augment: bool = False,
        smooth_fraction: float = 0.0,
        low_contrast_fraction: float = 0.0,
        low_contrast_min: float = 1 / 16,
    ) -> None:
        super().__init__()
        check_positive(scale=scale, batch_size=batch_size, val_batch_size=val_batch_size)
        check_positive(train_repeats=train_repeats)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        check_crop_size(crop_size, scale)
        self.save_hyperparameters()
        self.dirs: dict[Split, str | None] = {
            "train": train_dir,
            "val": val_dir,
            "test": test_dir,
            "predict": predict_dir,
        }
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.scale = scale
        self.train_repeats = train_repeats
        self.on_bad_image: BadInputPolicy = check_policy(on_bad_image)
        self.cache_images = cache_images
        self.augment = CropAugment(color_augment, smooth_fraction, low_contrast_fraction, low_contrast_min)
        self.datasets: dict[Split, ImageFolderDataset] = {}
        self.skips = SkipCollector()
        """Header-check skips of :meth:`setup` plus the decode skips the batches report (every worker)."""
        self._header_skips = SkipCounter("setup", self.on_bad_image)
        self._sizes: dict[Split, list[tuple[int, int]]] = {}
        self._scans: dict[Path, tuple[list[Path], list[tuple[int, int]]]] = {}
        self._elastic = ElasticResume()
        self._train_sampler: EpochSampler | None = None
        self._seed_base: int | None = None

    # ----------------------------------------------------------------------------------------------------
    # setup

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (all configured ones for ``None``), checking every header."""
        for split in self._splits_for(stage):
            if split in self.datasets:
                continue
            directory = self.dirs[split]
            assert directory is not None  # _splits_for only returns configured splits
            files, sizes = self._scan(directory)
            self.datasets[split] = ImageFolderDataset(
                files,
                mode="train" if split == "train" else "eval",
                crop_size=self.crop_size,
                on_bad_image=self.on_bad_image,
                repeats=self.train_repeats if split == "train" else 1,
                cache_images=self.cache_images and split == "train",
                augment=self.augment,
                name=split,
            )
            self._sizes[split] = sizes
        self.skips.update(self._header_skips.source, self._header_skips.count)
        self.skips.log(self.trainer)

    def _splits_for(self, stage: str | None) -> list[Split]:
        if stage is None:
            splits = [s for s in _ALL_SPLITS if self.dirs[s] is not None]
            if not splits:
                raise ValueError("ImageFolderDataModule has no folder configured (train_dir, val_dir, ...)")
            return splits
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGE_SPLITS)}")
        required, optional = _STAGE_SPLITS[stage]
        for split in required:
            if self.dirs[split] is None:
                raise ValueError(f"stage '{stage}' needs {split}_dir, which is not set")
        return [*required, *(s for s in optional if self.dirs[s] is not None)]

    def _scan(self, directory: str) -> tuple[list[Path], list[tuple[int, int]]]:
        """List a folder and read every header once (a folder used for two splits is scanned once)."""
        key = Path(directory).resolve()
        if key not in self._scans:
            files, sizes = [], []
            for path in list_images(directory):
                size = self._header_size(path)
                if size is not None:
                    files.append(path)
                    sizes.append(size)
            if not files:
                raise ValueError(f"image folder '{directory}' holds no readable images")
            self._scans[key] = (files, sizes)
        return self._scans[key]

    def _header_size(self, path: Path) -> tuple[int, int] | None:
        try:
            return image_size(path)
        except ImageReadError as exc:
            self._header_skips.skip(exc)  # raises under on_bad_image="error"
            return None

    # ----------------------------------------------------------------------------------------------------
    # skip counting

    @property
    def num_skipped(self) -> int:
        """Images left out on this rank so far: at the header check, and by the batches' workers."""
        return self.skips.total

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the workers' skip counters out of the batch and log the total as ``data/num_skipped``."""
        return self.skips.collect(batch, self.trainer)

    def teardown(self, stage: str) -> None:
        self.skips.report(int(getattr(self.trainer, "global_rank", 0)))

    # ----------------------------------------------------------------------------------------------------
    # dataloaders

    def train_dataloader(self) -> DataLoader:
        """This rank's part of each epoch's permutation; continues a checkpoint's epoch where it stopped."""
        dataset = self._dataset("train", "fit")
        trainer = self.trainer
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        drop_last = len(dataset) >= self.batch_size
        per_rank = math.ceil(len(dataset) / world)
        epoch_batches = per_rank // self.batch_size if drop_last else math.ceil(per_rank / self.batch_size)
        if trainer is not None:
            epoch_batches = limit_batches(epoch_batches, trainer.limit_train_batches)
        seed = self._order_seed_base(world)
        note = "it serves the rest of its order, none of it twice"
        rest = self._elastic.resume(trainer, self.batch_size, epoch_batches, note=note)
        self._train_sampler = EpochSampler(
            dataset,
            rank=rank,
            world_size=world,
            seed=seed,
            shared=True,
            epoch=current_epoch(trainer) if trainer is not None else 0,
            resume=rest,
            tag_samples=True,
        )
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _order_seed_base(self, world: int) -> int:
        """Epoch ``e`` is ordered (and its crops seeded) by ``base + e``: Lightning's ``DistributedSampler``
        rule, with ``seed_everything``'s seed (0 without one under DDP, where the ranks must agree). One
        unseeded process draws the base from torch's global RNG once, or takes it from the checkpoint it
        resumes (its epoch's order seed less the epoch), so a resumed run orders every later epoch as the
        uninterrupted one; a drawn order per epoch would depend on all the random numbers used before."""
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None or world > 1:
            return int(env or 0)
        saved = self._elastic.saved
        if saved is not None and saved.order_seed is not None:
            self._seed_base = saved.order_seed - saved.epoch
        elif self._seed_base is None:
            self._seed_base = int(torch.empty((), dtype=torch.int64).random_(0, 2**31).item())
        return self._seed_base

    # ----------------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The training position in world-size-free units (:class:`~tadm.datamodules.elastic.EpochPosition`)."""
        sampler = self._train_sampler
        return self._elastic.state_dict(
            self.trainer, self.batch_size, sampler.order_seed if sampler else None
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position; ``train_dataloader`` applies it once Lightning has restored its loops."""
        self._elastic.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # No val_dir during fit: an empty list tells Lightning there is nothing to validate.
        if self.dirs["val"] is None:
            return []
        return self._eval_loader("val", "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", "test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict", "predict")

    def _eval_loader(self, split: Split, stage: str) -> DataLoader:
        dataset = self._dataset(split, stage)
        batch_size = self.val_batch_size
        distinct = len(set(self._sizes[split]))
        if batch_size > 1 and distinct > 1:
            warnings.warn(
                f"{split}_dir '{self.dirs[split]}' has images of {distinct} different sizes, which cannot be "
                f"stacked into one batch; using batch size 1 instead of val_batch_size={batch_size}",
                stacklevel=3,
            )
            batch_size = 1
        return self._loader(dataset, batch_size, shuffle=False, drop_last=False)

    def _dataset(self, split: Split, stage: str) -> ImageFolderDataset:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split} dataset: call setup('{stage}') first (Lightning does this for you)"
            )
        return self.datasets[split]

    def _loader(
        self, dataset: ImageFolderDataset, batch_size: int, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


def check_crop_size(crop_size: int, scale: int) -> None:
    """A training crop must be a positive multiple of the scale and of 8, so the LR crop and the
    latent both have whole pixels."""
    multiple = math.lcm(scale, 8)
    if crop_size <= 0 or crop_size % multiple:
        raise ValueError(
            f"crop_size={crop_size} must be a positive multiple of {multiple} (of scale={scale} and of 8), "
            f"e.g. {max(multiple, round(crop_size / multiple) * multiple)}"
        )


def check_positive(**values: int) -> None:
    """Raise a ValueError naming the first argument that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
