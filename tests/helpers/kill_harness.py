"""Kill a training run anywhere and resume it from ``last.ckpt``: the harness of
``tests/training/test_kill_anywhere.py``.

A :class:`Scenario` trains the quickstart model (slimmed) with ``tadm fit`` on an image folder or on shards,
on one process or two (DDP, gloo), first once without interruption (the reference), then as a chain of
runs: each is SIGKILLed at a chosen :class:`Moment` and the next resumes from ``last.ckpt``
(``--ckpt_path``), until a run finishes. Every run is a forked child (one import of torch for all), in a
process group of its own, so a kill takes its DDP ranks with it. The moments are picked by a seeded RNG
from what the reference did (its training batches, validation batches and checkpoint saves): a kill from
inside the run, at a known point, is reproducible where a kill at a wall-clock time is not.

In the runs, :class:`KillSwitch` (a callback) seeds every training step (the model's noise), logs the
sample keys of every training batch and every checkpoint save to files, one fsynced line at a time (a kill
loses nothing logged before it), and kills at the moment: in a training step (its start, after the backward,
after the optimiser step but before the step's checkpoint), in a validation batch, or inside a checkpoint
save, after writing a share of the file (``serialize``: inside ``torch.save``, whatever it writes to;
``write``: in the bytes the save writes into the checkpoint folder, ``last.ckpt``'s own or a temp file's).
The temp folder of the runs is put on another filesystem where there is one (``/dev/shm``), as on a cluster
whose ``/tmp`` is a local disk: Lightning's own checkpoint IO then copies its temp file over ``last.ckpt``.

:func:`check_chain` then compares: the final checkpoint of the chain with the reference's, bit for bit
(weights, optimiser, LR schedule, EMA, data position), and the samples. "Read twice" is defined on the steps
that made it into the final weights: run ``r`` resumed from the checkpoint of step ``c_r`` contributes its
steps ``c_r <= s < c_{r+1}`` (those after the checkpoint the next run resumed from died with it). In the
union of those steps every step appears once per rank, each sample of an epoch exactly once, and they are
the reference's steps, same samples in the same order; a killed run's steps after its last checkpoint are
re-read, identically, by the next run, and no step before it is read again.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from tadm.training.callbacks import earlier_checkpoints
from tests.helpers import CONFIGS

#: where a moment lies in a training batch's timeline: its step, then its checkpoint saves, then validation
POINTS = {
    "train": ("batch_start", "after_backward", "batch_end"),
    "save": ("serialize", "write"),
    "val": ("val_batch",),
}
PHASES = tuple(POINTS)
#: the checkpoint entries an exact resume must reproduce (the others hold paths and loop counters of a run)
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "tadm_ema")
COMPARED_SUFFIX = ("DataModule", "nonfinite_steps")
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Moment:
    """Where a run is killed. ``batch``: the training batch (0-based; the global step before its optimiser
    step), whose checkpoint saves and validation follow it; ``point``: where in the phase (:data:`POINTS`);
    ``nth``: which save of the step (ModelCheckpoint writes the step's file, then ``last.ckpt``; ``file``
    names it) or which validation batch; ``fraction`` of the file's ``size`` (the reference's) is written
    before a kill mid-save; ``rank``: the rank that pulls the trigger (the whole process group dies)."""

    batch: int
    phase: str
    point: str
    nth: int = 0
    fraction: float = 0.5
    size: int = 0
    rank: int = 0
    file: str = ""  # the file a save writes

    @property
    def key(self) -> tuple[int, int, int]:
        """The moment's place in time; two moments with one key are one. A validation is one moment (a run
        resumed from the checkpoint of its step skips it, so no second kill could fall in it)."""
        if self.phase == "train":
            return (self.batch, POINTS["train"].index(self.point), 0)
        return (self.batch, 3, self.nth) if self.phase == "save" else (self.batch, 4, 0)

    def __str__(self) -> str:
        if self.phase == "save":
            share = f"{self.fraction:.0%} written"
            what = "last.ckpt" if self.file == "last.ckpt" else "the step's checkpoint"
            return f"saving {what} after batch {self.batch} ({self.point}, {share})"
        if self.phase == "val":
            return f"validation batch {self.nth} after batch {self.batch}, rank {self.rank}"
        return f"training batch {self.batch} ({self.point}), rank {self.rank}"


@dataclass
class Scenario:
    """One data module on one world size: the data, the run length and how many kills."""

    name: str
    kind: str  # "folder" | "shards"
    data: dict[str, Any]  # the data module's init_args
    out: Path
    devices: int = 1
    max_steps: int = 12
    kills: int = 3
    seed: int = 0
    val_every: int = 3  # validation every this many training batches of an epoch
    save_every: int = 2  # a checkpoint every this many steps
    last_ckpt_saves: bool = False  # every mid-save kill writes last.ckpt (else the top-k file or last.ckpt)
    save_points: tuple[str, ...] = POINTS["save"]  # where in a save a kill may fall
    phases: tuple[str, ...] = PHASES  # the phases the kills are drawn from, in turn
    lightning_io: bool = False  # Lightning's own checkpoint IO instead of tadm's atomic one (what it fixes)
    ema_decay: float = 0.9
    samples: int = 12  # training samples (what a whole epoch serves)

    @property
    def class_name(self) -> str:
        return "ImageFolderDataModule" if self.kind == "folder" else "WebDatasetDataModule"

    @property
    def key_field(self) -> str:
        return "path" if self.kind == "folder" else "key"


@dataclass
class RunPlan:
    """What the forked child of one run does (set before ``tadm fit`` starts, read by :class:`KillSwitch`)."""

    run: str
    logs: Path
    ckpt_dir: Path
    key_field: str
    moment: Moment | None = None
    lightning_io: bool = False


PLAN: RunPlan | None = None


# ------------------------------------------------------------------------------------------------------------
# inside a run


def log_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it: a SIGKILL right after loses nothing."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def kill_now(plan: RunPlan, late: bool = False) -> None:
    """Log the kill, then SIGKILL this run's whole process group (the DDP launcher and every rank)."""
    assert plan.moment is not None
    log_line(
        plan.logs / "events.jsonl", {"run": plan.run, "event": "kill", "late": late, **asdict(plan.moment)}
    )
    os.killpg(os.getpgrp(), signal.SIGKILL)
    time.sleep(60)  # never reached


class _Cutoff:
    """Counts the bytes a save writes into the checkpoint folder; kills once it has written ``threshold``."""

    def __init__(self, plan: RunPlan, threshold: int) -> None:
        self.plan, self.threshold, self.written = plan, max(1, threshold), 0

    def inside(self, path: str | os.PathLike[str] | int) -> bool:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        return Path(path).resolve().parent == self.plan.ckpt_dir.resolve()

    def allow(self, wanted: int) -> int:
        """How many of ``wanted`` bytes may still be written before the kill."""
        return min(wanted, self.threshold - self.written)

    def wrote(self, n: int, fd: int) -> None:
        self.written += n
        if self.written >= self.threshold:
            os.fsync(fd)
            kill_now(self.plan)


class _CutoffFile:
    """A file opened for writing in the checkpoint folder: its writes go through the cutoff."""

    def __init__(self, f: Any, cutoff: _Cutoff) -> None:
        self._f, self._cutoff = f, cutoff

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = self._cutoff.allow(len(view))
        self._f.write(view[:n])
        self._f.flush()
        self._cutoff.wrote(n, self._f.fileno())
        return len(view)

    def __enter__(self) -> _CutoffFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextmanager
def _armed(plan: RunPlan) -> Iterator[None]:
    """During one checkpoint save: ``torch.save`` (``serialize``), or the files and ``sendfile`` copies into
    the checkpoint folder (``write``), stop after the moment's share of the bytes and kill."""
    moment = plan.moment
    assert moment is not None
    real_save, real_open, real_sendfile = torch.save, builtins.open, os.sendfile  # io.open is builtins.open

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: int(len(buffer.getvalue()) * moment.fraction)]
        if isinstance(f, (str, os.PathLike)):
            with real_open(f, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        else:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
        kill_now(plan)

    cutoff = _Cutoff(plan, int(moment.size * moment.fraction))

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax") and isinstance(file, (str, os.PathLike, int))
        return _CutoffFile(f, cutoff) if writing and cutoff.inside(file) else f

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        if not cutoff.inside(out_fd):
            return real_sendfile(out_fd, in_fd, offset, count)
        sent = real_sendfile(out_fd, in_fd, offset, cutoff.allow(count))
        cutoff.wrote(sent, out_fd)
        return sent

    if moment.point == "serialize":
        torch.save = save
    else:
        builtins.open = io.open = open_  # type: ignore[assignment]
        os.sendfile = sendfile
    try:
        yield
    finally:
        torch.save, os.sendfile = real_save, real_sendfile
        builtins.open = io.open = real_open  # type: ignore[assignment]


class KillSwitch(L.Callback):
    """The harness inside a run (configured by the module's :data:`PLAN`): seeds every training step, logs
    every training batch's sample keys (per rank), every validation batch and checkpoint save (rank 0),
    and kills the run at its moment."""

    def __init__(self) -> None:
        self._save_step, self._saves = -1, 0

    @property
    def plan(self) -> RunPlan:
        assert PLAN is not None, "KillSwitch runs only in a harness run"
        return PLAN

    def _due(self, trainer: L.Trainer, phase: str, point: str, batch: int, nth: int = 0) -> bool:
        m = self.plan.moment
        return (
            m is not None
            and (m.phase, m.point, m.batch, m.nth) == (phase, point, batch, nth)
            and m.rank == trainer.global_rank
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        save = strategy.save_checkpoint

        def logged_save(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            step = trainer.global_step
            if step != self._save_step:
                self._save_step, self._saves = step, 0
            self._saves += 1
            m = self.plan.moment
            due = m is not None and m.phase == "save" and (m.batch, m.nth) == (step - 1, self._saves)
            if due and trainer.is_global_zero:
                with _armed(self.plan):
                    save(checkpoint, filepath, storage_options=storage_options)
                kill_now(self.plan, late=True)  # the IO wrote nothing where the trigger looks
            save(checkpoint, filepath, storage_options=storage_options)
            if trainer.is_global_zero:
                record = {"event": "save", "batch": step - 1, "nth": self._saves, "file": Path(filepath).name}
                log_line(
                    self.plan.logs / "events.jsonl",
                    {"run": self.plan.run, **record, "size": os.path.getsize(filepath)},
                )

        strategy.save_checkpoint = logged_save  # type: ignore[method-assign]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan.lightning_io:  # after every callback's setup: AtomicCheckpoints has installed its IO
            from lightning.pytorch.plugins.io import TorchCheckpointIO

            trainer.strategy.checkpoint_io = TorchCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log_line(
                self.plan.logs / "events.jsonl",
                {"run": self.plan.run, "event": "start", "step": trainer.global_step},
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        seed = 10_000 + 1_000 * rank + step  # the model's noise: what a resumed step draws again
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        keys = [Path(k).name for k in batch[self.plan.key_field]]
        record = {"run": self.plan.run, "rank": rank, "batch": step, "epoch": trainer.current_epoch}
        log_line(self.plan.logs / f"batches-rank{rank}.jsonl", {**record, "idx": batch_idx, "keys": keys})
        if self._due(trainer, "train", "batch_start", step):
            kill_now(self.plan)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer, "train", "after_backward", trainer.global_step):
            kill_now(self.plan)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._due(trainer, "train", "batch_end", trainer.global_step - 1):  # before the step's checkpoint
            kill_now(self.plan)

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            record = {
                "run": self.plan.run,
                "event": "val",
                "batch": trainer.global_step - 1,
                "nth": batch_idx,
            }
            log_line(self.plan.logs / "events.jsonl", record)
        if self._due(trainer, "val", "val_batch", trainer.global_step - 1, batch_idx):
            kill_now(self.plan)


# ------------------------------------------------------------------------------------------------------------
# the runs


def fit_args(sc: Scenario, root: Path, ckpt: Path | None) -> list[str]:
    """``tadm fit`` on the quickstart config, slimmed, with the scenario's data, world and checkpoints."""
    callbacks = [
        {
            "class_path": "tadm.training.callbacks.RunCheckpoint",
            "init_args": {
                "dirpath": str(root / "checkpoints"),
                "every_n_train_steps": sc.save_every,
                "save_last": True,
                "enable_version_counter": False,
            },
        },
        {"class_path": f"{__name__}.KillSwitch"},
    ]
    args = [
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--model.rescaler.init_args.width=16",
        "--model.rescaler.init_args.num_resblocks=1",
        "--model.rescaler.init_args.num_couplings=2",
        f"--model.ema_decay={sc.ema_decay}",
        f"--trainer.max_steps={sc.max_steps}",
        f"--trainer.devices={sc.devices}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.val_check_interval={sc.val_every}",
        "--trainer.limit_val_batches=2",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--data={json.dumps({'class_path': sc.class_name, 'init_args': sc.data})}",
    ]
    if sc.devices > 1:
        args.append("--trainer.strategy=ddp_fork")
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    return args


SHM = Path("/dev/shm")


def other_filesystem(near: Path) -> bool:
    """Whether ``/dev/shm`` is a writable folder on another filesystem than ``near``."""
    return SHM.is_dir() and os.access(SHM, os.W_OK) and os.stat(SHM).st_dev != os.stat(near).st_dev


def temp_dir_elsewhere(near: Path) -> Path | None:
    """A new temp folder on another filesystem than ``near`` (in ``/dev/shm``), or None."""
    return Path(tempfile.mkdtemp(prefix="tadm-kill-", dir=SHM)) if other_filesystem(near) else None


@dataclass
class RunResult:
    """How one run ended: SIGKILLed (at its moment, if the events say so) or with an exit code."""

    name: str
    killed: bool
    returncode: int | None
    seconds: float
    resumed_from: int | None  # the global step of the checkpoint it resumed, None for a fresh start


def run_fit(
    sc: Scenario, root: Path, name: str, moment: Moment | None, ckpt: Path | None, tmp: Path | None
) -> RunResult:
    """Fork one ``tadm fit`` run (a process group of its own) and wait for it to finish or die."""
    global PLAN
    root.mkdir(parents=True, exist_ok=True)
    resumed = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]) if ckpt else None
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the run
        code = 70
        try:
            os.setpgid(0, 0)
            out = os.open(root / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # not pytest's capture, into the log
            torch.set_num_threads(1)
            os.environ.pop("MASTER_PORT", None)  # a fresh port for every DDP run
            if tmp is not None:
                os.environ["TMPDIR"] = str(tmp)
                tempfile.tempdir = str(tmp)
            PLAN = RunPlan(name, root, root / "checkpoints", sc.key_field, moment, sc.lightning_io)
            from tadm.commands.lightning import lightning_main

            code = lightning_main(fit_args(sc, root, ckpt))
        except BaseException:  # noqa: BLE001 - the child reports through its log and exit code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(
                f"{sc.name}/{name} hung (killed after {RUN_TIMEOUT_S} s); see {root / name}.log"
            )
        time.sleep(0.05)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return RunResult(name, killed, code, time.monotonic() - start, resumed)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log (a line cut by a kill, if any, left out)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def pick_moments(sc: Scenario, events: list[dict[str, Any]]) -> list[Moment]:
    """``sc.kills`` distinct moments, drawn by a seeded RNG from what the reference did, the phases in turn
    (train, validation, save, ...), in the order they happen."""
    rng = random.Random(sc.seed)
    saves = [
        e for e in events if e["event"] == "save" and (e["file"] == "last.ckpt" or not sc.last_ckpt_saves)
    ]
    candidates: dict[str, list[Moment]] = {
        "train": [
            Moment(b, "train", p, rank=r)
            for b in range(sc.max_steps)
            for p in POINTS["train"]
            for r in range(sc.devices)
        ],
        "val": [Moment(e["batch"], "val", "val_batch", e["nth"]) for e in events if e["event"] == "val"],
        "save": [
            Moment(e["batch"], "save", p, e["nth"], size=e["size"], file=e["file"])
            for e in saves
            for p in sc.save_points
        ],
    }
    chosen: dict[tuple[int, int, int], Moment] = {}
    phases = [p for p in sc.phases if candidates[p]]
    order = [phases[i % len(phases)] for i in range(sc.kills)]
    rng.shuffle(order)
    for phase in order:
        free = [m for m in candidates[phase] if m.key not in chosen]
        m = rng.choice(free)
        if phase == "save":
            m = replace(m, fraction=round(rng.uniform(0.05, 0.95), 3))
        elif phase == "val":
            m = replace(m, rank=rng.randrange(sc.devices))
        chosen[m.key] = m
    return sorted(chosen.values(), key=lambda m: m.key)


@dataclass
class Chain:
    """A scenario's runs: the reference, then the killed runs and the one that finished."""

    scenario: Scenario
    moments: list[Moment]
    reference: RunResult
    runs: list[RunResult] = field(default_factory=list)
    cross_filesystem_temp: bool = False

    @property
    def ref_dir(self) -> Path:
        return self.scenario.out / "reference"

    @property
    def chain_dir(self) -> Path:
        return self.scenario.out / "chain"


def loadable(path: Path, where: str) -> None:
    """``last.ckpt`` exists and loads (a kill mid-save must leave the previous one intact)."""
    if not path.is_file():
        raise AssertionError(f"{where}: no last.ckpt to resume from")
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        raise AssertionError(f"{where}: last.ckpt does not load ({type(err).__name__}: {err})") from err


#: what a run imports on first use: imported once in the parent, not in every forked run (seconds each)
WARM_IMPORTS = ("tadm.commands.lightning", "torch.utils.tensorboard")
#: the EMA's import touches CUDA's fork guard: after it, Lightning's ddp_fork refuses to fork ranks
WARM_IMPORTS_ONE_PROCESS = ("diffusers.training_utils",)


def warm_up(devices: int) -> None:
    """Import what every run would import again (the CLI, the plug-ins, the logger's and, on one process,
    the EMA's modules)."""
    import importlib

    from tadm.config.plugins import load_plugins

    for name in WARM_IMPORTS + (WARM_IMPORTS_ONE_PROCESS if devices == 1 else ()):
        with suppress(ImportError):
            importlib.import_module(name)
    load_plugins()


def run_chain(sc: Scenario, moments: list[Moment] | None = None) -> Chain:
    """The reference run, then a run killed at each moment (each resuming the last one's ``last.ckpt``), then
    a run to the end. Runs fork from this process: under DDP it must not have touched CUDA
    (:func:`run_chain_isolated`)."""
    warm_up(sc.devices)
    sc.out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_elsewhere(sc.out)
    try:
        reference = run_fit(sc, sc.out / "reference", "reference", None, None, tmp)
        if moments is None:
            moments = pick_moments(sc, read_lines(sc.out / "reference" / "events.jsonl"))
        chain = Chain(sc, moments, reference, cross_filesystem_temp=tmp is not None)
        root = chain.chain_dir
        last = root / "checkpoints" / "last.ckpt"
        for i, moment in enumerate([*moments, None]):
            saved = any(
                e["event"] == "save" and e["file"] == last.name for e in read_lines(root / "events.jsonl")
            )
            if saved:  # else killed before the first last.ckpt: the run starts again from scratch
                loadable(last, f"{sc.name}: after the kill at {moments[i - 1]}")
            else:  # as a user starting over must: `tadm fit` refuses a fresh run over the step's finished
                # file a kill between it and last.ckpt leaves (temp files of a cut-short save stay)
                for path in earlier_checkpoints(last.parent):
                    os.remove(path)
            chain.runs.append(run_fit(sc, root, f"run{i}", moment, last if saved else None, tmp))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    (sc.out / "chain.json").write_text(json.dumps(_chain_record(chain)), encoding="utf-8")
    return chain


def _chain_record(chain: Chain) -> dict[str, Any]:
    scenario = {**asdict(chain.scenario), "out": str(chain.scenario.out)}
    return {
        "scenario": scenario,
        "moments": [asdict(m) for m in chain.moments],
        "reference": asdict(chain.reference),
        "runs": [asdict(r) for r in chain.runs],
        "cross_filesystem_temp": chain.cross_filesystem_temp,
    }


def _scenario(record: dict[str, Any]) -> Scenario:
    tuples = {k: tuple(v) for k, v in record.items() if k in ("save_points", "phases")}
    return Scenario(**{**record, **tuples, "out": Path(record["out"])})


def run_chain_isolated(sc: Scenario, timeout_s: float | None = None) -> Chain:
    """:func:`run_chain` in a fresh interpreter (this module as a script): a DDP run's ranks fork from it,
    and Lightning's ``ddp_fork`` refuses a process that touched CUDA, which a test session may have."""
    from tests.helpers import REPO

    sc.out.mkdir(parents=True, exist_ok=True)
    config = json.dumps({**asdict(sc), "out": str(sc.out)})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    timeout = timeout_s or RUN_TIMEOUT_S * (sc.kills + 2)
    cmd = [sys.executable, "-m", "tests.helpers.kill_harness", config]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{sc.name}: the runs hung (killed after {timeout} s); see {sc.out}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{sc.name}: the runs failed:\n{output[-4000:]}")
    record = json.loads((sc.out / "chain.json").read_text(encoding="utf-8"))
    chain = Chain(
        _scenario(record["scenario"]),
        [Moment(**m) for m in record["moments"]],
        RunResult(**record["reference"]),
        [RunResult(**r) for r in record["runs"]],
        record["cross_filesystem_temp"],
    )
    return chain


# ------------------------------------------------------------------------------------------------------------
# the checks


def same(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two checkpoint entries differ (tensors bit for bit, dtype included); empty when equal."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        equal = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if equal else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def compared_entries(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in checkpoint.items() if k in COMPARED or k.endswith(COMPARED_SUFFIX)}


def count_tensors(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(count_tensors(v) for v in value)
    return 0


@dataclass
class Outcome:
    """The numbers of a checked chain, for the closing note."""

    scenario: str
    devices: int
    moments: list[str]
    kills: int
    #: mid-save kills whose IO wrote nothing into the checkpoint folder (killed right after the save)
    late_kills: int
    resumes: int  # runs that resumed a checkpoint
    restarts: int  # runs killed before the first checkpoint, started again from scratch
    resume_steps: list[int]
    final_equal: bool
    tensors_compared: int
    differences: list[str]
    steps: int
    samples_per_epoch: int
    reread_steps: int  # steps a killed run had run past its last checkpoint, re-run by the next run
    stale_temp_files: list[str]  # what killed saves left in the checkpoint folder
    cross_filesystem_temp: bool
    seconds: float


def _batches(root: Path, devices: int) -> list[dict[str, Any]]:
    return [r for rank in range(devices) for r in read_lines(root / f"batches-rank{rank}.jsonl")]


def check_chain(chain: Chain) -> Outcome:
    """Assert what an exact resume must give (see the module docstring) and return the numbers."""
    sc = chain.scenario
    runs = chain.runs
    assert chain.reference.returncode == 0 and not chain.reference.killed, (
        f"the reference failed: {chain.ref_dir}"
    )
    events = read_lines(chain.chain_dir / "events.jsonl")
    kills = [e for e in events if e["event"] == "kill"]
    for i, (run, moment) in enumerate(zip(runs, chain.moments, strict=False)):
        assert run.killed, f"{sc.name}: run{i} was not killed at {moment} (exit {run.returncode})"
        assert [k for k in kills if k["run"] == run.name], f"{sc.name}: run{i} died, but not by the harness"
    final = runs[-1]
    assert final.returncode == 0 and not final.killed, (
        f"{sc.name}: the last run failed, see {chain.chain_dir}"
    )
    # every resume loaded the last checkpoint that was completely written before the kill
    for i, run in enumerate(runs[1:], start=1):
        saved = [e for e in events if e["event"] == "save" and e["file"] == "last.ckpt" and _run_index(e) < i]
        assert run.resumed_from == (saved[-1]["batch"] + 1 if saved else None), (
            f"{sc.name}: run{i} resumed step {run.resumed_from}, but the last complete save was "
            f"{saved[-1] if saved else None}"
        )
    # (a) bit for bit
    ref = torch.load(chain.ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(chain.chain_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ref["global_step"] == sc.max_steps
    ref_entries, got_entries = compared_entries(ref), compared_entries(got)
    assert set(ref_entries) >= {"state_dict", "optimizer_states", "tadm_ema", "global_step"}
    differences = same(ref_entries, got_entries)
    # (b) the samples
    reference = _batches(chain.ref_dir, sc.devices)
    batches = _batches(chain.chain_dir, sc.devices)
    starts = [run.resumed_from or 0 for run in runs] + [sc.max_steps]
    kept, reread = [], 0
    for i, run in enumerate(runs):
        mine = [r for r in batches if r["run"] == run.name]
        assert not mine or min(r["batch"] for r in mine) == starts[i], (
            f"{sc.name}: run{i} read before its checkpoint"
        )
        kept += [r for r in mine if starts[i] <= r["batch"] < starts[i + 1]]
        lost = [r for r in mine if r["batch"] >= starts[i + 1]]  # died with the run
        again = {(r["batch"], r["rank"]): r["keys"] for r in batches if r["run"] == f"run{i + 1}"}
        for r in lost:
            assert again.get((r["batch"], r["rank"])) == r["keys"], (
                f"{sc.name}: run{i + 1} re-read step {r['batch']} otherwise"
            )
        reread += len({r["batch"] for r in lost})

    def strip(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((r["batch"], r["rank"], r["epoch"], r["idx"], tuple(r["keys"])) for r in records)

    assert [(b, r) for b, r, *_ in strip(kept)] == [
        (b, r) for b in range(sc.max_steps) for r in range(sc.devices)
    ]
    assert strip(kept) == strip(reference), f"{sc.name}: the kept steps are not the reference's"
    per_epoch = _samples_per_epoch(kept)
    for epoch, keys in per_epoch.items():
        assert len(keys) == len(set(keys)), f"{sc.name}: epoch {epoch} read {_twice(keys)} twice"
        if epoch < max(per_epoch):  # a whole epoch: every sample once
            assert len(keys) == sc.samples, (
                f"{sc.name}: epoch {epoch} read {len(keys)} of {sc.samples} samples"
            )
    full = [len(set(k)) for k in per_epoch.values()]
    return Outcome(
        scenario=sc.name,
        devices=sc.devices,
        moments=[str(m) for m in chain.moments],
        kills=len(kills),
        late_kills=sum(bool(k["late"]) for k in kills),
        resumes=sum(run.resumed_from is not None for run in runs),
        restarts=sum(run.resumed_from is None for run in runs[1:]),
        resume_steps=[run.resumed_from or 0 for run in runs[1:]],
        final_equal=not differences,
        tensors_compared=count_tensors(ref_entries),
        differences=differences[:20],
        steps=sc.max_steps,
        samples_per_epoch=max(full) if full else 0,
        reread_steps=reread,
        stale_temp_files=sorted(p.name for p in (chain.chain_dir / "checkpoints").glob(".*")),
        cross_filesystem_temp=chain.cross_filesystem_temp,
        seconds=round(chain.reference.seconds + sum(r.seconds for r in runs), 1),
    )


def _run_index(event: dict[str, Any]) -> int:
    return int(str(event["run"]).removeprefix("run"))


def _samples_per_epoch(records: list[dict[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in records:
        out.setdefault(r["epoch"], []).extend(r["keys"])
    return out


def _twice(keys: list[str]) -> list[str]:
    return sorted({k for k in keys if keys.count(k) > 1})


def summary(outcome: Outcome) -> str:
    """One line: kills, resumes, whether the final checkpoint is the reference's, steps re-run, time."""
    equal = "bit-equal" if outcome.final_equal else f"DIFFERENT at {outcome.differences[:3]}"
    return (
        f"{outcome.scenario}: {outcome.kills} kills ({outcome.late_kills} right after a save), "
        f"{outcome.resumes} resumes (from steps {outcome.resume_steps}), {outcome.restarts} restarts; "
        f"final checkpoint {equal} ({outcome.tensors_compared} tensors); {outcome.steps} steps x "
        f"{outcome.devices} rank(s), {outcome.reread_steps} re-run; {outcome.seconds} s of runs"
    )


def data_for(kind: str, root: Path, num_workers: int = 0) -> dict[str, Any]:
    """A small training set (12 samples) and 2 validation images, as a folder or as shards."""
    from tests.helpers.shards import write_images, write_shards

    if kind == "folder":
        write_images(root / "train", [(40, 40)] * 12)
        write_images(root / "val", [(32, 32)] * 2, seed=5)
        folders = {"train_dir": str(root / "train"), "val_dir": str(root / "val")}
        return {**folders, "crop_size": 32, "batch_size": 2, "train_repeats": 1, "num_workers": num_workers}
    train = write_shards(root / "train", [6, 6], size=(40, 40))
    val = write_shards(root / "val", [2], size=(32, 32), seed=9)
    return {
        "train_shards": str(train),
        "val_shards": str(val),
        "crop_size": 32,
        "batch_size": 2,
        "shuffle_buffer": 4,
        "num_workers": num_workers,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_chain(_scenario(json.loads(sys.argv[1])))
