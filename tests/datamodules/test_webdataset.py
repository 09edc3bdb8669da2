"""WebDataset streaming: shard URLs, rank/worker splitting, fixed epochs, equal evaluation shares, corrupt
samples, exact decoding, cached latents and resuming (single process; DDP runs in test_ddp_webdataset.py)."""

from __future__ import annotations

import inspect
import io
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tadm.datamodules.bad_input import InputSkippedWarning
from tadm.datamodules.image_folder import ImageFolderDataModule
from tadm.datamodules.image_io import decode_uint8, load_image, uint8_to_unit
from tadm.datamodules.image_transforms import reflect_pad
from tadm.datamodules.placement import Ownership
from tadm.datamodules.shard_streams import EvalShardStream, LatentSpec, Pixels, TrainShardStream
from tadm.datamodules.shard_writer import LatentOptions, pack_shards
from tadm.datamodules.shards import expand_shards
from tadm.datamodules.webdataset import WebDatasetDataModule
from tests.helpers.loggers import MetricsLogger
from tests.helpers.shards import all_keys, keys_of, tar_keys, write_images, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")
#: streams given no counts (as without index.json) deal out whole shards, and warn that ranks may be unequal
WHOLE_SHARDS = pytest.mark.filterwarnings("ignore::tadm.datamodules.placement.UnevenPlacementWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 5, 3, 4 and 6 samples (18 in all), 40x48 images."""
    return write_shards(tmp_path_factory.mktemp("wds"), [5, 3, 4, 6])


def _urls(root: Path) -> list[str]:
    return [str(p) for p in sorted(root.glob("shard-*.tar"))]


# ------------------------------------------------------------------------------------------------------------
# URLs


def test_shard_specs_expand_to_the_same_urls(shards: Path) -> None:
    urls = _urls(shards)
    assert expand_shards(str(shards)) == urls  # a folder: its index.json
    assert expand_shards(str(shards / "index.json")) == urls
    assert expand_shards(f"{shards}/shard-{{000000..000003}}.tar") == urls
    assert expand_shards(urls) == urls
    assert expand_shards("::".join(urls[:2])) == urls[:2]
    assert expand_shards([f"{shards}/shard-{{000000..000001}}.tar", urls[3]]) == [*urls[:2], urls[3]]


def test_missing_shard_and_folder_without_index_fail_at_setup_naming_them(
    shards: Path, tmp_path: Path
) -> None:
    dm = WebDatasetDataModule(train_shards=f"{shards}/shard-{{000000..000005}}.tar", crop_size=32, scale=16)
    with pytest.raises(FileNotFoundError, match=r"train shard '.*shard-000004\.tar' does not exist"):
        dm.setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' has no index\.json"):
        WebDatasetDataModule(train_shards=str(tmp_path / "empty"), crop_size=32, scale=16).setup("fit")
    with pytest.raises(ValueError, match="needs val_shards"):
        WebDatasetDataModule(train_shards=str(shards), crop_size=32, scale=16).setup("validate")
    with pytest.raises(ValueError, match="crop_size=40 must be a positive multiple of 16"):
        WebDatasetDataModule(train_shards=str(shards), crop_size=40, scale=16)
    with pytest.raises(ValueError, match="scheme 'nosuchscheme://' is known to neither"):
        WebDatasetDataModule(train_shards="nosuchscheme://b/shard-0.tar", crop_size=32).setup("fit")


def test_remote_scheme_without_its_fsspec_backend_fails_at_setup_with_a_hint() -> None:
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    dm = WebDatasetDataModule(train_shards="s3://bucket/train/shard-{000000..000009}.tar", crop_size=32)
    with pytest.raises(
        ImportError, match=r"pip install s3fs.*pipe:aws s3 cp s3://bucket/train/shard-000000\.tar -"
    ):
        dm.setup("fit")


def test_pipe_and_fsspec_urls_stream_the_same_samples(shards: Path) -> None:
    import fsspec

    urls = _urls(shards)
    fs = fsspec.filesystem("memory")
    for url in urls:
        fs.pipe(f"/tadm-test/{Path(url).name}", Path(url).read_bytes())
    variants = {
        "local": urls,
        "pipe": [f"pipe:cat {u}" for u in urls],
        "fsspec": [f"memory://tadm-test/{Path(u).name}" for u in urls],
    }
    seen = {}
    for name, variant in variants.items():
        stream = TrainShardStream(variant, crop_size=32, batch_size=1, samples_per_epoch=18, shuffle_buffer=1)
        seen[name] = Counter(keys_of(stream))
    assert seen["local"] == seen["pipe"] == seen["fsspec"] == Counter(all_keys(shards))


# ------------------------------------------------------------------------------------------------------------
# splitting work (fair shares from the counts: test_fair_placement.py)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3)])
def test_every_sample_belongs_to_exactly_one_rank_and_worker(
    num_shards: int, world: int, workers: int
) -> None:
    sizes = [5, 3, 4, 6, 2, 5, 1][:num_shards]
    owners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rank in range(world):
        for worker in range(workers):
            plan = Ownership.plan(num_shards, rank, world, worker, workers)
            for shard in plan.shards:
                for pos in range(sizes[shard]):
                    if plan.owns(shard, pos):
                        owners.setdefault((shard, pos), []).append((rank, worker))
    expected = {(s, p) for s in range(num_shards) for p in range(sizes[s])}
    assert set(owners) == expected
    assert all(len(v) == 1 for v in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
    # shard-level split (split_by_node, split_by_worker) whenever there are enough shards
    if num_shards >= world * workers:
        plan = Ownership.plan(num_shards, 0, world, 0, workers)
        assert not plan.rank_by_sample and not plan.worker_by_sample


@WHOLE_SHARDS
def test_ranks_read_disjoint_samples_and_one_epoch_covers_their_shards(shards: Path) -> None:
    urls = _urls(shards)  # 5, 3, 4, 6 samples: rank 0 reads shards 0 and 2 (9), rank 1 shards 1 and 3 (9)
    per_rank = []
    for rank in range(2):
        stream = TrainShardStream(urls, 32, batch_size=3, samples_per_epoch=9, rank=rank, world_size=2)
        keys = keys_of(stream, batch_size=3)
        assert len(keys) == len(stream) == 9
        assert len(set(keys)) == 9  # one pass: every sample once
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == all_keys(shards)


@WHOLE_SHARDS
def test_workers_split_shards_and_every_rank_runs_the_same_number_of_batches(shards: Path) -> None:
    urls = _urls(shards)
    lengths = []
    for rank in range(3):  # 3 ranks over 4 unequal shards: rank 0 has 11 samples, ranks 1 and 2 have 3 and 4
        stream = TrainShardStream(urls, 32, batch_size=2, samples_per_epoch=7, rank=rank, world_size=3)
        loader = DataLoader(stream, batch_size=2, drop_last=True, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 7 samples -> 3 whole batches, whatever the rank holds
        lengths.append(len(batches))
        keys = [k for b in batches for k in b["key"]]
        own = {k for i in range(rank, 4, 3) for k in tar_keys(Path(urls[i]))}
        assert set(keys) <= own
    assert len(set(lengths)) == 1


def test_streams_are_reproducible_and_reshuffled_per_epoch_and_start_step(shards: Path) -> None:
    def run(epoch: int, start: int) -> tuple[list[str], torch.Tensor]:
        stream = TrainShardStream(_urls(shards), 32, batch_size=1, samples_per_epoch=18, shuffle_buffer=4)
        stream.set_position(epoch, start)
        samples = list(stream)
        return [s["key"] for s in samples], torch.stack([s["image"] for s in samples])

    keys, images = run(0, 0)
    again_keys, again_images = run(0, 0)
    assert keys == again_keys and torch.equal(images, again_images)
    assert sorted(keys) == sorted(all_keys(shards))
    assert run(1, 18)[0] != keys  # a new epoch: a new order
    assert run(1, 20)[0] != run(1, 18)[0]  # resumed mid-epoch: not the epoch's original order


def _stream_batches(
    urls: list[str], done: int = 0, num_workers: int = 0, crops: int = 1, epoch: int = 2
) -> list[tuple[list[str], torch.Tensor]]:
    """The batches of epoch ``epoch`` (6 batches of 3), its first ``done`` already run (a resume)."""
    stream = TrainShardStream(
        urls, 32, batch_size=3, samples_per_epoch=18, shuffle_buffer=4, crops_per_image=crops
    )
    stream.set_position(epoch, epoch * 6, done)
    loader = DataLoader(stream, batch_size=3, drop_last=True, num_workers=num_workers)
    return [(list(b["key"]), b["image"]) for b in loader]


@pytest.mark.parametrize(("num_workers", "crops"), [(0, 1), (2, 1), (3, 1), (0, 3)])
def test_a_stream_resumed_mid_epoch_serves_the_rest_of_the_uninterrupted_epoch(
    shards: Path, num_workers: int, crops: int
) -> None:
    """Skipping the batches already run (read, not decoded) leaves the walk, the worker that serves each
    batch (round-robin from worker 0 again) and every crop and flip as they were: the very same batches.
    With 3 crops per image the crops met while skipping wait undecoded in the spreading buffer."""
    urls = _urls(shards)
    whole = _stream_batches(urls, num_workers=num_workers, crops=crops)
    assert len(whole) == 6
    for done in (1, 2, 4, 5):
        rest = _stream_batches(urls, done, num_workers=num_workers, crops=crops)
        assert [k for k, _ in rest] == [k for k, _ in whole[done:]], f"after {done} batches"
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, whole[done:], strict=True))


def test_eval_gives_every_rank_the_same_number_of_batches_and_covers_all(shards: Path) -> None:
    urls = _urls(shards)
    counts = [5, 3, 4, 6]
    for world in (1, 2, 4, 5):
        for batch in (1, 4):
            seen: list[str] = []
            lengths = set()
            for rank in range(world):
                stream = EvalShardStream(urls, counts, batch, rank, world)
                loader = DataLoader(stream, batch_size=batch)
                batches = list(loader)
                assert len(batches) == len(loader)
                lengths.add(len(batches))
                assert sum(len(b["key"]) for b in batches) == stream.per_rank == -(-18 // world)
                seen += [k for b in batches for k in b["key"]]
                # workers share a rank's batches round-robin, each worker whole batches
                parts = [stream.indices(w, 3) for w in range(3)]
                assert sorted(sum(parts, [])) == sorted(stream.indices())
            assert len(lengths) == 1
            assert set(seen) == all_keys(shards)
            assert len(seen) - 18 < world  # padding (wrapped-around repeats) only on the short ranks


@WHOLE_SHARDS
def test_fewer_samples_than_ranks_still_gives_everyone_data(tmp_path: Path) -> None:
    one = write_shards(tmp_path, [1])
    urls = _urls(one)
    for rank in range(3):
        assert len(list(EvalShardStream(urls, [1], 1, rank, 3))) == 1
        stream = TrainShardStream(urls, 32, batch_size=2, samples_per_epoch=2, rank=rank, world_size=3)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert len(list(stream)) == 2
        borrowed = any("owns no sample" in str(w.message) for w in record)
        assert borrowed == (rank > 0)  # the single sample is rank 0's; the others repeat it rather than stall


# ------------------------------------------------------------------------------------------------------------
# corrupt data


def _corrupt_shard(path: Path, src: Path) -> list[str]:
    """A shard with good samples, an undecodable JPEG, a sample without image and a bad .json; keys in order."""
    good = sorted(src.iterdir())
    members: list[tuple[str, bytes]] = []
    for i, p in enumerate(good[:2]):
        members.append((f"good{i}.{p.suffix[1:]}", p.read_bytes()))
    members.append(("broken.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"))
    members.append(("noimage.json", b'{"path": "x"}'))
    members += [("badmeta.png", good[0].read_bytes()), ("badmeta.json", b"{not json")]
    members.append(("good2.png", good[0].read_bytes()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ["good0", "good1", "broken", "noimage", "badmeta", "good2"]


def test_corrupt_samples_are_skipped_with_a_warning_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src, [(40, 48)] * 2)
    shard = tmp_path / "bad.tar"
    _corrupt_shard(shard, src)
    stream = TrainShardStream([str(shard)], 32, batch_size=1, samples_per_epoch=3, shuffle_buffer=1)
    with pytest.warns(InputSkippedWarning) as record:
        samples = list(stream)
    assert sorted(s["key"] for s in samples) == ["good0", "good1", "good2"]
    assert stream.num_skipped == 3
    assert [s["_skipped"] for s in samples][-1] == 3
    messages = " ".join(str(w.message) for w in record)
    assert "broken" in messages and "no image" in messages and "unreadable .json" in messages

    # evaluation keeps its count: the 3 bad samples are replaced by copies of good ones
    with pytest.warns(InputSkippedWarning):
        evald = list(EvalShardStream([str(shard)], [6], 1))
    assert len(evald) == 6 and {s["key"] for s in evald} == {"good0", "good1", "good2"}
    # on_bad_image="error" raises at the first one (for debugging)
    strict = TrainShardStream([str(shard)], 32, 1, 3, shuffle_buffer=1, on_bad_image="error")
    with pytest.raises(Exception, match="broken"):
        list(strict)


def test_truncated_shard_is_skipped_and_eval_still_fills_its_share(shards: Path, tmp_path: Path) -> None:
    data = (shards / "shard-000003.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    good = _urls(shards)[0]
    train = TrainShardStream([good, str(cut)], 32, batch_size=1, samples_per_epoch=20, shuffle_buffer=1)
    with pytest.warns(InputSkippedWarning, match="damaged"):
        keys = [s["key"] for s in train]
    assert len(keys) == 20 and set(keys) <= all_keys(shards)
    with pytest.warns(InputSkippedWarning, match="ended before"):
        evald = list(EvalShardStream([good, str(cut)], [5, 6], 1))
    assert len(evald) == 11


class KeyModule(L.LightningModule):
    """One parameter; records the keys of every training batch by global step (no backbone, no rescaler)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.keys: dict[int, list[str]] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert "_skipped" not in batch  # the data module's hook takes its counters out
        self.keys[self.global_step + 1] = list(batch["key"])
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SteppingKeyModule(KeyModule):
    """Reads ``estimated_stepping_batches`` in ``configure_optimizers``, as tadm's LR schedules do: Lightning
    then builds the training loader before it restores a checkpoint's loops."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_data_module_logs_the_skip_count(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src, [(40, 48)] * 2)
    _corrupt_shard(tmp_path / "bad.tar", src)
    logger = MetricsLogger()
    dm = WebDatasetDataModule(
        train_shards=str(tmp_path / "bad.tar"),
        crop_size=32,
        batch_size=1,
        samples_per_epoch=3,
        shuffle_buffer=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputSkippedWarning)
        _trainer(tmp_path, max_epochs=1, logger=logger).fit(KeyModule(), datamodule=dm)
    assert dm.num_skipped == 3
    logged = logger.values("data/num_skipped")
    assert logged and logged[-1] == 3


class EvalKeyModule(KeyModule):
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert "_skipped" not in batch


def test_lightning_sees_sized_loaders_without_its_iterable_dataset_caution(
    shards: Path, tmp_path: Path
) -> None:
    """Lightning cautions about any DataLoader over an IterableDataset with a length; the shard loaders are
    sized iterables of batches instead, and no process-wide filter hides the caution."""
    caution = "Your `IterableDataset` has `__len__` defined"
    assert not any(f[1] is not None and "IterableDataset" in f[1].pattern for f in warnings.filters)
    dm = WebDatasetDataModule(
        train_shards=str(shards), val_shards=str(shards), crop_size=32, batch_size=3, val_batch_size=2
    )
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=None, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(EvalKeyModule(), datamodule=dm)
    assert not [w for w in record if caution in str(w.message)]
    assert trainer.num_training_batches == 6 and trainer.num_val_batches == [9]


def test_both_data_modules_share_the_bad_input_option_and_its_default() -> None:
    for module in (ImageFolderDataModule, WebDatasetDataModule):
        parameters = inspect.signature(module.__init__).parameters
        assert parameters["on_bad_image"].default == "skip", module.__name__
        assert "on_bad_sample" not in parameters
        with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip'"):
            module(on_bad_image="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------
# exact decoding


def test_uint8_crops_equal_load_image_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the decoded image is 53x37
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif)
    for name in ("a.png", "a.jpg", "gray.png", "rot.jpg"):
        data = (tmp_path / name).read_bytes()
        u8 = decode_uint8(data, name)
        assert u8 is not None and u8.dtype == torch.uint8
        full = load_image(tmp_path / name)
        assert torch.equal(uint8_to_unit(u8), full), name
        padded = Pixels(data, name, 64)  # smaller than the crop: mirror-padded like the image folder
        assert torch.equal(padded.crop(0, 0, 64), reflect_pad(full, 64, 64)), name
        assert torch.equal(Pixels(data, name, 32).crop(3, 5, 32), full[:, 3:35, 5:37]), name


def test_images_without_a_uint8_path_decode_exactly_like_load_image(tmp_path: Path) -> None:
    rgba = np.random.default_rng(2).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(rgba[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    for name in ("alpha.png", "gray16.png"):
        data = (tmp_path / name).read_bytes()
        assert decode_uint8(data, name) is None
        assert torch.equal(Pixels(data, name, 16).crop(2, 3, 16), load_image(tmp_path / name)[:, 2:18, 3:19])


# ------------------------------------------------------------------------------------------------------------
# cached latents


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Images (one smaller than the crop) packed with tiny-sd15 latents of 2 fixed 64-crops + flips."""
    from tadm.testing.twins.unet_twins import StableDiffusionTwin

    root = tmp_path_factory.mktemp("latents")
    write_images(root / "src", [(80, 96), (72, 64), (48, 56)])
    backbone = StableDiffusionTwin("tiny-sd15")
    backbone.load_for_stage("rescaler")
    opts = LatentOptions(backbone, crop=64, crops_per_image=2, flips=True)
    pack_shards(root / "src", root / "shards", latents=opts)
    return root / "shards", backbone


def _tiny_module(backbone: Any) -> Any:
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.training.lightning_module import TADMModule

    rescaler = DFRM(scale=16, width=16, num_resblocks=1, pixel_width=8, num_couplings=1, coupling_growth=8)
    return TADMModule(backbone=backbone, rescaler=rescaler, scale=16)


def test_cached_latents_give_the_same_loss_as_encoding_on_the_fly(latent_shards: tuple[Path, Any]) -> None:
    from tadm.training.losses import weighted_sum

    root, backbone = latent_shards
    module = _tiny_module(backbone)
    dm = WebDatasetDataModule(
        train_shards=str(root), crop_size=64, batch_size=6, latents=True, crops_per_image=2
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].dtype == torch.float16 and batch["latent"].shape == (6, 4, 8, 8)
    # one epoch = the six stored crops of the three images, each with its own latent
    assert sorted(Counter(batch["key"]).values()) == [2, 2, 2]
    with torch.no_grad():
        fresh = backbone.encode(batch["image"])
    torch.testing.assert_close(batch["latent"].float(), fresh, atol=2e-3, rtol=2e-3)

    def loss(b: dict[str, Any]) -> torch.Tensor:
        torch.manual_seed(0)  # the rescaler's quantisation noise
        terms = module.rescaler.training_losses(b["image"], module._latent(b), module.distance)
        return weighted_sum(terms, module.loss_weights)

    cached = loss(batch)
    on_the_fly = loss({k: v for k, v in batch.items() if k != "latent"})
    torch.testing.assert_close(cached, on_the_fly, rtol=2e-3, atol=1e-5)


def test_latent_flips_match_the_flipped_crops(latent_shards: tuple[Path, Any]) -> None:
    root, backbone = latent_shards
    stream = TrainShardStream(
        [str(root / "shard-000000.tar")], 64, 1, 24, crops_per_image=2, latent=LatentSpec((4, 8, 8), True)
    )
    samples = list(stream)
    images = torch.stack([s["image"] for s in samples])
    with torch.no_grad():
        fresh = backbone.encode(images)
    cached = torch.stack([s["latent"].float() for s in samples])
    torch.testing.assert_close(cached, fresh, atol=2e-3, rtol=2e-3)
    # crops were served both ways round (3 images x 2 crops = 6 boxes, up to 12 distinct crops)
    distinct = {tuple(img.flatten()[:16].tolist()) for img in images}
    assert 6 < len(distinct) <= 12


def test_latents_are_used_only_when_they_match(latent_shards: tuple[Path, Any], tmp_path: Path) -> None:
    root, backbone = latent_shards
    with pytest.raises(ValueError, match="latents: true, but the latents were cached for crops of 64"):
        WebDatasetDataModule(train_shards=str(root), crop_size=32, latents=True).setup("fit")
    plain = write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="describes no cached latents"):
        WebDatasetDataModule(train_shards=str(plain), crop_size=32, latents=True).setup("fit")
    dm = WebDatasetDataModule(train_shards=str(root), crop_size=64, batch_size=2, latents=False)
    dm.setup("fit")
    assert "latent" not in next(iter(dm.train_dataloader()))
    auto = WebDatasetDataModule(train_shards=str(root), crop_size=64, batch_size=2)
    auto.setup("fit")  # no model to compare with: the index's latents at this crop size are used
    assert "latent" in next(iter(auto.train_dataloader()))
    other = WebDatasetDataModule(train_shards=str(root), crop_size=64, batch_size=2)
    other.connect("stable_diffusion:tiny-sd21:random-seed2100", latent_rescaler=True)
    with pytest.warns(
        UserWarning, match="the latents come from backbone .*tiny-sd15.*the model uses .*tiny-sd21"
    ):
        other.setup("fit")
    assert "latent" not in next(iter(other.train_dataloader()))
    pixel = WebDatasetDataModule(train_shards=str(root), crop_size=64, batch_size=2)
    pixel.connect(
        backbone.backbone_id, latent_rescaler=False
    )  # a pixel-space rescaler has no use for latents
    pixel.setup("fit")
    assert "latent" not in next(iter(pixel.train_dataloader()))


def test_cached_latent_shards_train_through_the_cli_without_encoding(
    latent_shards: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/data/webdataset.yaml composed after an experiment: a fast_dev_run from cached latents."""
    from tadm.commands.lightning import TADMCLI
    from tadm.testing.twins import twin_args
    from tadm.training.lightning_module import TADMModule
    from tests.helpers import REPO

    root, _ = latent_shards
    monkeypatch.chdir(tmp_path)
    args = [
        "--config",
        str(REPO / "configs" / "experiments" / "rescaler_x16.yaml"),
        "--config",
        str(REPO / "configs" / "data" / "webdataset.yaml"),
        *twin_args("tiny-sd15"),
        "--model.rescaler.init_args.width=16",
        "--model.rescaler.init_args.num_resblocks=1",
        "--model.rescaler.init_args.num_couplings=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--data.init_args.train_shards={root}",
        f"--data.init_args.val_shards={root}",
        "--data.init_args.crop_size=64",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]
    cli = TADMCLI(TADMModule, L.LightningDataModule, subclass_mode_data=True, run=False, args=args)
    assert isinstance(cli.datamodule, WebDatasetDataModule)
    encode = cli.model.backbone.encode
    calls = {"train": 0}

    def counting_encode(x: torch.Tensor) -> torch.Tensor:
        calls["train"] += int(cli.trainer.training)
        return encode(x)

    monkeypatch.setattr(cli.model.backbone, "encode", counting_encode)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/psnr_y" in cli.trainer.callback_metrics
    assert calls["train"] == 0, "training encoded images although cached latents were served"


# ------------------------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("module_class", [KeyModule, SteppingKeyModule])
def test_resume_continues_the_epoch_exactly_where_the_checkpoint_stopped(
    tmp_path: Path, module_class: type[KeyModule]
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = write_shards(tmp_path, [6, 6])  # 12 samples; batch 3 -> 4 steps per epoch

    def fit(name: str, max_steps: int, ckpt: Path | None = None) -> KeyModule:
        module = module_class()
        dm = WebDatasetDataModule(train_shards=str(root), crop_size=32, batch_size=3, shuffle_buffer=4)
        save = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)
        trainer = _trainer(
            tmp_path, max_steps=max_steps, max_epochs=100, callbacks=[save], enable_checkpointing=True
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        assert trainer.global_step == max_steps
        return module

    full = fit("a", 8).keys
    assert sorted(k for s in (1, 2, 3, 4) for k in full[s]) == sorted(all_keys(root))
    # resumed mid-epoch (after step 5 of 8): steps 6-8 are the uninterrupted run's, none of step 5 again
    mid = fit("b", 8, tmp_path / "a" / "epoch=1-step=5.ckpt").keys
    assert mid == {s: full[s] for s in (6, 7, 8)}, "the resumed epoch left its walk"
    # resumed at an epoch boundary: exactly the uninterrupted run
    edge = fit("c", 8, tmp_path / "a" / "epoch=0-step=4.ckpt").keys
    assert edge == {s: full[s] for s in (5, 6, 7, 8)}
