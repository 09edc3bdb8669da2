"""Training from shards on several processes: 2-process DDP on CPU (gloo), and two `torchrun --nnodes 2`
launches on localhost (slow). Ranks must read disjoint samples that together cover the shards, run the same
number of batches, and never hang. The quickstart's own callbacks and TensorBoard logger run under DDP too
(2 forked ranks, and the torchrun launches): every process exits 0, rank 0 alone reports and writes.

Each run is a child process group with a timeout: a hang fails the test instead of blocking the suite.
Lightning's DDP launcher starts rank 1 by re-running this file as a script (see ``__main__`` below).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DDP_TIMEOUT_S = 240


class KeyRecorder(L.Callback):
    """Writes, per rank, the sample keys of every training batch (by epoch) and of every validation batch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.train: dict[int, list[list[str]]] = {}
        self.val: list[list[list[str]]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self.train.setdefault(trainer.current_epoch, []).append(list(batch["key"]))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val.append([])

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        self.val[-1].append(list(batch["key"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "train": self.train,
            "val": self.val,
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class TinyModule(L.LightningModule):
    """One parameter that every batch touches (DDP needs every parameter in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.w * batch["image"].mean()) ** 2

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/mean", batch["image"].mean(), sync_dist=True, batch_size=len(batch["key"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _ddp_main(config: dict[str, Any]) -> None:
    """One 2-process DDP fit; runs as a script (rank 0 from the test, rank 1 from Lightning's launcher)."""
    from tadm.datamodules.webdataset import WebDatasetDataModule

    torch.set_num_threads(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=config["epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[KeyRecorder(config["out"])],
    )
    trainer.fit(TinyModule(), datamodule=WebDatasetDataModule(**config["data"]))


def _run(cmd: list[str], cwd: Path, timeout: float = DDP_TIMEOUT_S) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait(procs: list[subprocess.Popen[str]], timeout: float = DDP_TIMEOUT_S) -> list[str]:
    """Wait for every process; kill all their process groups and fail on a timeout or an error.

    Returns each process's output (stdout and stderr)."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP run hung (killed after {timeout} s)")
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"
    return outputs


def _records(out: Path, world: int = 2) -> list[dict[str, Any]]:
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["world"] for r in records] == [world] * world
    return records


def _check_epochs(records: list[dict[str, Any]], everything: set[str], epochs: int, batches: int) -> None:
    """Per epoch: equal batch counts, disjoint keys across ranks, all keys covered."""
    for epoch in map(str, range(epochs)):
        per_rank = [[k for b in r["train"][epoch] for k in b] for r in records]
        assert [len(r["train"][epoch]) for r in records] == [batches] * len(records)
        sets = [set(keys) for keys in per_rank]
        assert not sets[0] & sets[1], f"epoch {epoch}: ranks share {sets[0] & sets[1]}"
        assert sets[0] | sets[1] == everything, f"epoch {epoch}: missing {everything - (sets[0] | sets[1])}"
    orders = [[k for b in records[0]["train"][str(e)] for k in b] for e in range(epochs)]
    assert len({tuple(o) for o in orders}) == epochs, "every epoch is reshuffled"


def _check_validation(records: list[dict[str, Any]], everything: set[str], batches: int) -> None:
    for run in range(len(records[0]["val"])):
        assert [len(r["val"][run]) for r in records] == [batches] * len(records)
        assert {k for r in records for b in r["val"][run] for k in b} == everything


def test_two_ranks_read_disjoint_samples_covering_the_shards(tmp_path: Path) -> None:
    from tests.helpers.shards import all_keys, write_shards

    train = write_shards(tmp_path / "train", [6, 6, 6, 6], size=(40, 40))
    val = write_shards(tmp_path / "val", [2, 2, 1], size=(40, 40), seed=9)
    config = {
        "epochs": 2,
        "out": str(tmp_path / "out"),
        # 24 samples: 12 per rank, 6 batches, dealt to 2 workers per rank (1 shard each)
        "data": {"train_shards": str(train), "val_shards": str(val), "crop_size": 32, "batch_size": 2}
        | {"val_batch_size": 2, "num_workers": 2, "shuffle_buffer": 4},
    }
    _wait([_run([sys.executable, __file__, json.dumps(config)], tmp_path)])
    records = _records(tmp_path / "out")
    _check_epochs(records, all_keys(train), epochs=2, batches=6)
    for r in records:  # one pass: every sample of the rank exactly once per epoch
        keys = [k for b in r["train"]["0"] for k in b]
        assert len(keys) == len(set(keys)) == 12
    # 5 validation images: 3 per rank (rank 1 repeats one), in 2 batches on both ranks
    assert len(records[0]["val"]) == 2
    _check_validation(records, all_keys(val), batches=2)


@pytest.mark.slow  # ~20 s of a `make test` worker; run by `make test-all`
def test_three_shards_on_two_ranks_finish_without_hanging(tmp_path: Path) -> None:
    from tests.helpers.shards import all_keys, write_shards

    shards = write_shards(tmp_path / "data", [5, 3, 4], size=(40, 40))
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    config = {
        "epochs": 2,
        "out": str(tmp_path / "out"),
        # 12 samples balanced by the index: 6 per rank (5 + 1 and 4 + 2); both run 3 batches of 3 per epoch
        "data": {"train_shards": str(shards), "val_shards": [urls[0], urls[2]], "crop_size": 32}
        | {"batch_size": 3, "samples_per_epoch": 9, "val_batch_size": 2, "shuffle_buffer": 8},
    }
    _wait([_run([sys.executable, __file__, json.dumps(config)], tmp_path)])
    records = _records(tmp_path / "out")
    _check_epochs(records, all_keys(shards), epochs=2, batches=3)
    rank0 = [k for b in records[0]["train"]["0"] for k in b]
    assert len(set(rank0)) == 6  # the rank's 6 samples, all read within the 9 of an epoch
    # 9 validation images over 2 ranks: 5 each (one repeated), 3 batches (2 + 2 + 1) on both
    val_keys = {k for i in (0, 2) for k in all_keys_of(urls[i])}
    _check_validation(records, val_keys, batches=3)


def _tiny_quickstart(save_dir: Path, *configs: Path) -> list[str]:
    """``tadm fit`` on the quickstart YAML (then ``configs``) with its own callbacks and TensorBoard logger,
    logging to ``save_dir``, shrunk."""
    return [
        "-m",
        "tadm.commands.main",
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        *(a for c in configs for a in ("--config", str(c))),
        "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--model.rescaler.init_args.width=32",
        "--model.rescaler.init_args.num_resblocks=1",
        "--model.rescaler.init_args.num_couplings=2",
        "--data.init_args.crop_size=64",
        "--data.init_args.batch_size=1",
        "--data.init_args.num_workers=0",
    ]


def _check_run_folder(run: Path, steps: int, output: str) -> None:
    """Logs, ``last.ckpt`` of the final step and the config under one run folder; rank 0 reported once."""
    assert list((run / "version_0").glob("events.out.tfevents.*")), sorted(run.rglob("*"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    assert (run / "checkpoints" / "config.yaml").is_file()
    assert output.count("bicubic down + up") == 1, output[-4000:]
    assert f"Checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in output


@pytest.mark.slow  # ~16 s of a `make test` worker; run by `make test-all`
def test_quickstart_callbacks_and_logger_on_two_ranks(tmp_path: Path) -> None:
    """The shipped callbacks and logger under DDP: the run exits 0 (no collective is left to rank 0 alone),
    rank 0 alone reports, and the final step is saved although it is off the validation boundary.

    ``ddp_fork``: the same gloo collectives as ``ddp`` (the slow torchrun test runs that), but the ranks are
    forked from one process that imported everything once, which keeps this test short."""
    samples = REPO / "assets" / "samples"
    fit = _tiny_quickstart(tmp_path / "out") + [
        "--trainer.strategy=ddp_fork",
        "--trainer.devices=2",
        "--trainer.max_steps=3",  # 6 photos, 2 ranks: 3 steps; validation (and a save) after step 2
        "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=1",
        f"--data.init_args.train_dir={samples / 'train'}",
        f"--data.init_args.val_dir={samples / 'val'}",
        "--data.init_args.train_repeats=1",
    ]
    output = _wait([_run([sys.executable, *fit], tmp_path)])[0]
    _check_run_folder(tmp_path / "out" / "quickstart", steps=3, output=output)


def all_keys_of(url: str) -> set[str]:
    from tests.helpers.shards import tar_keys

    return set(tar_keys(Path(url)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_with_torchrun_on_localhost(tmp_path: Path) -> None:
    """The recipe of docs/data.md: `tadm shard`, then the same YAML (its callbacks and logger included) under two
    `torchrun --nnodes 2` launches; both exit 0."""
    from tadm.commands.main import main
    from tests.helpers.shards import all_keys

    samples = REPO / "assets" / "samples"
    assert main(["shard", str(samples / "train"), str(tmp_path / "train"), "--maxcount", "1", "--quiet"]) == 0
    assert main(["shard", str(samples / "val"), str(tmp_path / "val"), "--maxcount", "1", "--quiet"]) == 0
    out = tmp_path / "out"
    webdataset = REPO / "configs" / "data" / "webdataset.yaml"
    fit = _tiny_quickstart(tmp_path / "runs", webdataset) + [  # its callbacks and logger, plus a recorder
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.callbacks+=tests.training.test_ddp_webdataset.KeyRecorder",
        f"--trainer.callbacks.out={out}",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
    ]
    port = _free_port()
    nodes = [
        _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={n}",
            ]
            + ["--master-addr=127.0.0.1", f"--master-port={port}", *fit],
            tmp_path,
        )
        for n in range(2)
    ]
    outputs = _wait(nodes, timeout=600)
    # node 0 (rank 0) writes the logs, the checkpoints and the report; node 1 prints no report
    _check_run_folder(tmp_path / "runs" / "quickstart", steps=6, output=outputs[0])
    assert "bicubic down + up" not in outputs[1]
    records = _records(out)
    # 6 photos in 6 shards: 3 per node and epoch, disjoint, together all of them
    _check_epochs(records, all_keys(tmp_path / "train"), epochs=2, batches=3)
    _check_validation(records, all_keys(tmp_path / "val"), batches=1)


if __name__ == "__main__":
    _ddp_main(json.loads(sys.argv[1]))
