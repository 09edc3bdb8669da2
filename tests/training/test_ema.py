"""EMA of the trained tensors (``model.ema_decay``, :mod:`tadm.model.ema`): the average equals one computed
by hand, only trained tensors are averaged, validation swaps it in and restores the raw weights exactly,
a resumed run continues it bit for bit, ``tadm export`` and the codec use it unless told ``--weights
raw``, and the two ranks of a 2-process DDP run (gloo, CPU) hold identical EMA tensors.

Lightning's DDP launcher forks the ranks of the DDP test from a child process running this file as a
script (see ``__main__`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from tadm.errors import CheckpointError
from tadm.model.checkpoints import EMA_KEY, export_checkpoint, exported_weights, read_checkpoint
from tadm.model.ema import TrainedEMA, check_ema_args, decay_at
from tadm.training.ema_callback import EMAWeights

REPO = Path(__file__).resolve().parents[2]
DDP_TIMEOUT_S = 240


def hand_decay(u: int, decay: float, start: int) -> float:
    """The documented warm-up, written out: a copy up to update start + 1, then (u - s) / (9 + u - s)."""
    return 0.0 if u <= start + 1 else min(decay, (u - start) / (9 + u - start))


# ------------------------------------------------------------------------------------------- unit
def test_ema_of_a_subset_equals_a_hand_computed_average() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[1].requires_grad_(False)  # frozen: not averaged
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    ema = TrainedEMA(named, decay=0.3, start_step=2)
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    hand = {n: p.detach().double().clone() for n, p in named}
    decays = []
    for u in range(1, 13):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        ema.update()
        d = hand_decay(u, 0.3, 2)
        decays.append(d)
        for n, p in named:
            hand[n] = d * hand[n] + (1 - d) * p.detach().double()
    # both regimes: plain copies, the warm-up ramp (2/11, 3/12) and the cap (0.3)
    assert decays[:6] == pytest.approx([0, 0, 0, 2 / 11, 3 / 12, 0.3])
    assert [decay_at(u, 0.3, 2) for u in range(1, 13)] == pytest.approx(decays)
    assert ema.updates == 12
    assert list(ema.weights()) == ["0.weight", "0.bias"]
    for n, _ in named:
        torch.testing.assert_close(ema.weights()[n].double(), hand[n], rtol=0, atol=1e-6)
    assert not torch.allclose(ema.weights()["0.weight"], net[0].weight)  # it lags the weights


def test_swapping_in_and_out_restores_the_raw_weights_exactly() -> None:
    torch.manual_seed(1)
    net = nn.Linear(8, 8)
    ema = TrainedEMA(list(net.named_parameters()), decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    average = {n: t.clone() for n, t in ema.weights().items()}
    with ema.swapped_in():
        for n, p in net.named_parameters():
            assert torch.equal(p, average[n])
            assert torch.equal(ema.raw_weights()[n], raw[n])  # what a checkpoint saved now would store
    for n, p in net.named_parameters():
        assert torch.equal(p, raw[n])
        assert torch.equal(ema.weights()[n], average[n])


@pytest.mark.parametrize(("decay", "start"), [(1.0, 0), (0.0, 0), (-0.5, 0), (0.99, -1)])
def test_bad_settings_are_refused(decay: float, start: int) -> None:
    with pytest.raises(ValueError, match="ema_"):
        check_ema_args(decay, start)


def test_a_damaged_or_foreign_ema_state_is_refused() -> None:
    net = nn.Linear(2, 2)
    ema = TrainedEMA(list(net.named_parameters()), decay=0.9)
    with pytest.raises(CheckpointError, match="damaged"):
        ema.load_state_dict({"weights": {"weight": 1.0}, "updates": 3}, "x.ckpt")
    with pytest.raises(CheckpointError, match="does not match"):
        ema.load_state_dict({"weights": {"other": torch.zeros(2)}, "updates": 3}, "x.ckpt")
    state = ema.state_dict() | {"weights": {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}}
    with pytest.raises(CheckpointError, match="shape"):
        ema.load_state_dict(state, "x.ckpt")


# ----------------------------------------------------------------------------- on the tiny model
DECAY, START, STEPS, SAVE_AT = 0.2, 1, 4, 2
#: no perceptual loss networks (the EMA does not care which loss trained the weights), one validation batch
CHEAP = [
    "--model.loss_weights={pixel: 1.0}",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]


def _batches(n: int = 8) -> torch.utils.data.DataLoader[Any]:
    """The same 64x64 image every batch: a resumed run sees what the uninterrupted one saw."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return torch.utils.data.DataLoader([{"image": image}] * n, batch_size=1)


class Recorder(L.Callback):
    """Seeds every step (the noisy quantisation draws), records the trained weights after each optimiser
    step, saves a checkpoint at step ``save_at`` where ModelCheckpoint would (on_train_batch_end), and
    the weights validation runs with."""

    def __init__(self, save_to: Path | None = None) -> None:
        self.save_to = save_to
        self.steps: list[dict[str, Tensor]] = []
        self.ema_at_save: dict[str, Tensor] = {}
        self.validated_with: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(100 + trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_trainable_parameters()})
        if self.save_to is not None and trainer.global_step == SAVE_AT:
            trainer.save_checkpoint(self.save_to)
            self.ema_at_save = {n: t.clone() for n, t in pl_module.ema.weights().items()}

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.validated_with = {n: p.detach().clone() for n, p in pl_module.named_trainable_parameters()}


def _cli(root: Path, *extra: str) -> Any:
    from tests.helpers.cli import build_cli, stage_args

    args = [f"--model.ema_decay={DECAY}", f"--model.ema_start_step={START}", *CHEAP]
    return build_cli(stage_args(stage="enhancer", root=root, extra=[*args, *extra]))


@dataclass
class Run:
    """The uninterrupted run: its module, recorder and checkpoints (step SAVE_AT and the last step)."""

    model: Any
    recorder: Recorder
    mid: Path
    final: Path
    initial: dict[str, Tensor]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the resume test compares bit for bit with a run on the same thread count
    root = tmp_path_factory.mktemp("ema_run")
    cli = _cli(root, f"--trainer.max_steps={STEPS}")
    recorder = Recorder(save_to=root / "step2.ckpt")
    cli.trainer.callbacks.append(recorder)
    initial = {n: p.detach().clone() for n, p in cli.model.named_trainable_parameters()}
    cli.trainer.fit(cli.model, train_dataloaders=_batches())
    cli.trainer.save_checkpoint(root / "last.ckpt")
    yield Run(cli.model, recorder, root / "step2.ckpt", root / "last.ckpt", initial)
    torch.set_num_threads(threads)


def test_fit_averages_exactly_the_trained_tensors_as_documented(run: Run) -> None:
    m = run.model
    trained = [n for n, _ in m.named_trainable_parameters()]
    assert list(m.ema.weights()) == trained and m.ema.updates == STEPS
    assert any(".lora_" in n for n in trained) and not any(n.startswith("rescaler.") for n in trained)
    hand = {n: t.double() for n, t in run.initial.items()}
    for u, weights in enumerate(run.recorder.steps, start=1):
        d = hand_decay(u, DECAY, START)
        hand = {n: d * hand[n] + (1 - d) * weights[n].double() for n in hand}
    for n in trained:
        torch.testing.assert_close(m.ema.weights()[n].double(), hand[n], rtol=0, atol=1e-6)
    moved = [n for n in trained if not torch.equal(run.recorder.steps[-1][n], run.recorder.steps[-2][n])]
    assert moved and any(not torch.equal(m.ema.weights()[n], run.recorder.steps[-1][n]) for n in moved)


def test_checkpoints_hold_the_raw_weights_and_the_ema_of_their_step(run: Run) -> None:
    mid = torch.load(run.mid, weights_only=True)
    assert mid["global_step"] == SAVE_AT and mid[EMA_KEY]["updates"] == SAVE_AT
    assert mid[EMA_KEY]["decay"] == DECAY and mid[EMA_KEY]["start_step"] == START
    assert list(mid[EMA_KEY]["weights"]) == list(run.recorder.ema_at_save)
    for n, t in run.recorder.ema_at_save.items():
        assert torch.equal(mid[EMA_KEY]["weights"][n], t), n
        assert torch.equal(mid["state_dict"][n], run.recorder.steps[SAVE_AT - 1][n]), n  # raw
    assert not any(
        k.startswith("backbone.") and ".lora_" not in k and "conv_in" not in k
        for k in mid[EMA_KEY]["weights"]
    )


def test_validation_uses_the_ema_and_restores_the_raw_weights_exactly(run: Run) -> None:
    m = run.model
    raw = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    m.trainer.validate(m, dataloaders=_batches(1), verbose=False)
    assert run.recorder.validated_with.keys() == raw.keys()
    for n, p in m.named_trainable_parameters():
        assert torch.equal(run.recorder.validated_with[n], m.ema.weights()[n]), n
        assert torch.equal(p.detach(), raw[n]), n
    assert any(not torch.equal(m.ema.weights()[n], raw[n]) for n in raw)


class ValidationFails(RuntimeError):
    pass


def _failing_step(*args: Any, **kwargs: Any) -> None:
    raise ValidationFails("a validation batch went wrong")


def test_validation_that_raises_leaves_the_raw_weights_in_place(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``EMAWeights.on_exception`` the averages stayed in the parameters (``ema.swapped`` True)."""
    m = run.model
    raw = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    monkeypatch.setattr(m, "validation_step", _failing_step)
    with pytest.raises(ValidationFails):
        m.trainer.validate(m, dataloaders=_batches(1), verbose=False)
    assert not m.ema.swapped
    assert any(not torch.equal(m.ema.weights()[n], raw[n]) for n in raw)  # the swap would show
    for n, p in m.named_trainable_parameters():
        assert torch.equal(p.detach(), raw[n]), n


def test_a_fit_stopped_in_validation_keeps_training_the_raw_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation after step 2 raises; a second fit of the same module starts from the raw step-2
    weights, not from the EMA that validation had swapped in (a notebook user re-running a cell)."""
    cli = _cli(
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.num_sanity_val_steps=0",
    )
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    m = cli.model
    monkeypatch.setattr(m, "validation_step", _failing_step)
    with pytest.raises(ValidationFails):
        cli.trainer.fit(m, train_dataloaders=_batches(), val_dataloaders=_batches(1))
    after_two, ema = recorder.steps[-1], m.ema.weights()
    assert len(recorder.steps) == 2 and recorder.validated_with.keys() == after_two.keys()
    assert all(torch.equal(recorder.validated_with[n], ema[n]) for n in ema)  # it ran with the averages
    assert any(not torch.equal(ema[n], t) for n, t in after_two.items())
    for n, p in m.named_trainable_parameters():
        assert torch.equal(p.detach(), after_two[n]), n

    # a module left with the averages in by other means (a trainer without this module's callbacks):
    # the next fit puts the raw weights back before it starts a new EMA from them
    m.ema.swap_in()
    old_ema = m.ema
    EMAWeights().on_fit_start(cli.trainer, m)
    assert m.ema is not old_ema and m.ema.updates == 0 and not old_ema.swapped
    for n, p in m.named_trainable_parameters():
        assert torch.equal(p.detach(), after_two[n]), n


def test_validating_a_checkpoint_swaps_in_its_ema(run: Run) -> None:
    """``tadm validate --ckpt_path``: no EMA exists before; the checkpoint's is swapped in."""
    stored = torch.load(run.final, weights_only=True)
    m, ema = run.model, run.model.ema
    try:
        m.ema = None
        m.trainer.validate(m, dataloaders=_batches(1), ckpt_path=str(run.final), verbose=False)
        for n, t in stored[EMA_KEY]["weights"].items():
            assert torch.equal(run.recorder.validated_with[n], t), n
        for n, p in m.named_trainable_parameters():
            assert torch.equal(p.detach(), stored["state_dict"][n]), n
    finally:
        m.ema = ema


def test_resume_continues_the_same_ema(run: Run, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = _cli(tmp_path, f"--trainer.max_steps={STEPS}")
        cli.trainer.callbacks.append(Recorder())
        cli.trainer.fit(cli.model, train_dataloaders=_batches(), ckpt_path=str(run.mid))
    finally:
        torch.set_num_threads(threads)
    resumed, whole = cli.model, run.model
    assert cli.trainer.global_step == STEPS and resumed.ema.updates == STEPS
    for n, p in whole.named_trainable_parameters():
        assert torch.equal(dict(resumed.named_trainable_parameters())[n], p), f"raw {n}"
        assert torch.equal(resumed.ema.weights()[n], whole.ema.weights()[n]), f"ema {n}"


def test_resuming_an_ema_of_other_tensors_is_refused(run: Run) -> None:
    """As Lightning resumes: on_load_checkpoint before the EMA exists, the EMA built in on_fit_start."""
    ckpt = torch.load(run.mid, weights_only=True)
    first = next(iter(ckpt[EMA_KEY]["weights"]))
    ckpt[EMA_KEY]["weights"]["aligner.no_such_weight"] = ckpt[EMA_KEY]["weights"].pop(first)
    m, ema = run.model, run.model.ema
    try:
        m.ema = None
        m.on_load_checkpoint(ckpt)
        with pytest.raises(CheckpointError, match="does not match this model's trained parameters"):
            EMAWeights().on_fit_start(m.trainer, m)
    finally:
        m.ema, m._ema_pending = ema, None


# ---------------------------------------------------------------------------- export and codec
def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def test_read_checkpoint_gives_the_ema_by_default_and_raw_on_request(run: Run) -> None:
    ema = run.model.ema.weights()
    state, meta = read_checkpoint(run.final)
    raw_state, raw_meta = read_checkpoint(run.final, weights="raw")
    assert meta["weights"] == "ema" and raw_meta["weights"] == "raw"
    assert state.keys() == raw_state.keys() and set(ema) < set(state)
    for n in state:
        want = ema[n] if n in ema else raw_state[n]  # untrained (the frozen rescaler): raw in both
        assert torch.equal(state[n], want), n
    for n, p in run.model.named_trainable_parameters():
        assert torch.equal(raw_state[n], p.detach()), n


def test_export_writes_the_ema_by_default_and_records_which(run: Run, tmp_path: Path) -> None:
    from tadm.commands.main import main

    ema, (raw, _) = run.model.ema.weights(), read_checkpoint(run.final, weights="raw")
    out = export_checkpoint(run.final, tmp_path / "ema.safetensors")
    assert exported_weights(out) == "ema"
    got, meta = read_checkpoint(out)
    assert meta["weights"] == "ema" and read_checkpoint(out, weights="ema")[0].keys() == got.keys()
    for n, t in got.items():
        want = ema[n] if n in ema else raw[n]
        assert torch.equal(t, want if n.startswith("rescaler.") else _bf16(want)), n

    raw_out = tmp_path / "raw.safetensors"
    assert main(["export", str(run.final), "-o", str(raw_out), "--weights", "raw"]) == 0
    with safe_open(str(raw_out), framework="pt") as f:
        assert f.metadata()["weights"] == "raw" and json.loads(f.metadata()["tadm"])["weights"] == "raw"
    got_raw, _ = read_checkpoint(raw_out, weights="raw")
    assert all(torch.equal(got_raw[n], _bf16(raw[n])) for n in ema)
    with pytest.raises(CheckpointError, match="holds the ema weights only"):
        read_checkpoint(out, weights="raw")
    with pytest.raises(CheckpointError, match="holds the raw weights only"):
        read_checkpoint(raw_out, weights="ema")


def test_a_checkpoint_without_ema_gives_raw_weights_and_refuses_ema(run: Run, tmp_path: Path) -> None:
    ckpt = torch.load(run.final, weights_only=True)
    del ckpt[EMA_KEY]
    plain = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain)
    state, meta = read_checkpoint(plain)
    assert "weights" not in meta and all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_checkpoint(plain, weights="ema")
    out = export_checkpoint(plain, tmp_path / "plain.safetensors")
    assert exported_weights(out) == "raw"


def test_the_codec_loads_the_ema_unless_told_raw(run: Run) -> None:
    from tadm.commands.common import add_model_arguments
    from tadm.model.loading import load_codec

    ema, (raw, _) = run.model.ema.weights(), read_checkpoint(run.final, weights="raw")
    codecs = {w: load_codec(run.final, weights=w) for w in (None, "raw")}
    for weights, want in ((None, ema), ("raw", raw)):
        params = dict(codecs[weights].module.named_parameters())
        assert all(torch.equal(params[n].detach(), want[n]) for n in ema), weights
    assert codecs[None].model_id != codecs["raw"].model_id  # LR files made with one refuse the other
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    assert ap.parse_args(["--ckpt", "c"]).weights is None
    assert ap.parse_args(["--ckpt", "c", "--weights", "raw"]).weights == "raw"


# ------------------------------------------------------------------------------------------ DDP
class RankDump(L.Callback):
    """Writes, per rank, its first batch, and its EMA and raw trained tensors at the end of the fit."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.first: Tensor | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first is None:
            self.first = batch["image"].detach().clone()

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        record = {
            "ema": {n: t.clone() for n, t in pl_module.ema.weights().items()},
            "raw": {n: p.detach().clone() for n, p in pl_module.named_trainable_parameters()},
            "updates": pl_module.ema.updates,
            "first": self.first,
            "world": trainer.world_size,
        }
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def _ddp_main(config: dict[str, Any]) -> None:
    """A 2-process DDP fit (gloo on CPU) with an EMA, 3 steps: the quickstart config, slimmed, without its
    logger and callbacks. Its trained set is the whole DFRM (the subset case is tested above in one
    process); the enhancer stage's tiny SD twin doubles the time under DDP."""
    from tests.helpers.cli import build_cli, data_args

    torch.set_num_threads(1)
    out = config["out"]
    cli = build_cli(
        ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.ema_decay=0.5"]
        + ["--model.rescaler.init_args.width=16", "--model.rescaler.init_args.num_resblocks=1"]
        + ["--model.rescaler.init_args.num_couplings=2", "--trainer.max_steps=3", "--trainer.devices=2"]
        + ["--trainer.strategy=ddp_fork", "--trainer.logger=false", "--trainer.callbacks=[]"]
        + ["--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false"]
        + ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}"]
        + [*data_args(crop=64, batch=1), "--data.init_args.num_workers=0", "--data.init_args.train_repeats=1"]
    )  # 6 photos, 2 ranks, batch 1: 3 steps, each rank on its own photos
    cli.trainer.callbacks.append(RankDump(out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.mark.slow  # ~20 s of a `make test` worker; run by `make test-all`
def test_two_ddp_ranks_hold_identical_ema_tensors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, json.dumps({"out": str(tmp_path)})]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output = proc.communicate(timeout=DDP_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP run hung (killed after {DDP_TIMEOUT_S} s)")
    assert proc.returncode == 0, output[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["updates"] for r in ranks] == [3, 3]
    assert not torch.equal(ranks[0]["first"], ranks[1]["first"])  # the ranks trained on different crops
    assert ranks[0]["ema"].keys() == ranks[1]["ema"].keys() and ranks[0]["ema"]
    for n in ranks[0]["ema"]:
        assert torch.equal(ranks[0]["ema"][n], ranks[1]["ema"][n]), n
        assert torch.equal(ranks[0]["raw"][n], ranks[1]["raw"][n]), n
    assert any(not torch.equal(ranks[0]["ema"][n], ranks[0]["raw"][n]) for n in ranks[0]["ema"])


if __name__ == "__main__":
    _ddp_main(json.loads(sys.argv[1]))


def test_the_average_of_bf16_weights_is_kept_in_float32_and_follows_them() -> None:
    """bf16-true weights: after 2000 updates at 1.0 the weights jump to 1.5; each later update moves the
    average by (1 - decay) x 0.5 <= 0.0023, under half a bf16 step at 1.0 (0.0039), so a bf16 average never
    leaves 1.0. Kept in float32 it follows the hand-computed average. Swapping in casts back to bf16; the
    state holds float32 and loads back as float32."""
    w = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    ema = TrainedEMA([("w", w)], decay=0.999)
    expected = 1.0
    for u in range(1, 4001):
        if u == 2001:
            with torch.no_grad():
                w.fill_(1.5)
        ema.update()
        d = decay_at(u, 0.999)
        expected = d * expected + (1 - d) * float(w[0])
    avg = ema.weights()["w"]
    assert 1.49 < expected < 1.5
    assert avg.dtype == torch.float32 and torch.allclose(avg, torch.full((8,), expected), atol=1e-4), avg
    with ema.swapped_in():
        assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), avg.to(torch.bfloat16))
    assert torch.equal(w.detach(), torch.full((8,), 1.5, dtype=torch.bfloat16))
    again = TrainedEMA([("w", w)], decay=0.999)
    again.load_state_dict(ema.state_dict(), "test")
    assert again.weights()["w"].dtype == torch.float32 and torch.equal(again.weights()["w"], avg)
