"""Kill a fit anywhere, resume it from ``last.ckpt``, and get the uninterrupted run, bit for bit.

``tests/helpers/kill_harness.py`` trains the quickstart model (slimmed) with ``tadm fit`` on 12 small photos,
as an image folder or as WebDataset shards, SIGKILLs it at moments a seeded RNG picks (in a training step,
in a validation batch, in the middle of writing a checkpoint), resumes each time from ``last.ckpt``
(``--ckpt_path``) and checks that

- every resume loaded the last checkpoint completely written before its kill (a kill mid-save leaves the
  previous ``last.ckpt`` loadable);
- the final checkpoint equals the uninterrupted run's bit for bit: weights, optimiser, LR schedule, EMA,
  data position (one process and two, on CPU);
- the steps that made it into the final weights (run r's steps from its checkpoint up to the checkpoint
  the next run resumed) are the uninterrupted run's steps, same samples in the same order: no sample of an
  epoch read twice or left out; a killed run's steps past its last checkpoint are re-read, identically, by
  the next run, and nothing before that checkpoint is read again (the harness's docstring says it in full).

Fast: the image folder, one process, one kill per phase (the mid-save kill in the bytes written for
``last.ckpt``). Slow (``make test-all``): 12 kills for each data module (the shards read by 2 DataLoader
workers), two DDP ranks (gloo) for each, and the proof that the checks can fail: with Lightning's own
checkpoint IO and the temp folder on another filesystem, a kill while ``last.ckpt`` is copied in leaves it
truncated. Every test prints its numbers (kills, resumes, equal final checkpoints) and adds them to
``kill_anywhere.json`` in pytest's temp root.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.helpers.kill_harness import (
    Chain,
    Moment,
    Outcome,
    Scenario,
    check_chain,
    data_for,
    other_filesystem,
    run_chain,
    run_chain_isolated,
    summary,
)


def _report(tmp_path_factory: pytest.TempPathFactory, outcome: Outcome) -> None:
    """Print the numbers and add them to the session's JSON (what a closing note quotes)."""
    path = tmp_path_factory.getbasetemp() / "kill_anywhere.json"
    known = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*known, asdict(outcome)], indent=1))
    print(summary(outcome))


def _run(
    tmp_path: Path,
    name: str,
    kind: str,
    moments: list[Moment] | None = None,
    num_workers: int = 0,
    **settings: object,
) -> tuple[Chain, Outcome]:
    """The scenario's runs (in a fresh interpreter under DDP, see ``run_chain_isolated``), checked."""
    data = data_for(kind, tmp_path / "data", num_workers)
    scenario = Scenario(name, kind, data, tmp_path / "out", **settings)  # type: ignore[arg-type]
    chain = run_chain_isolated(scenario) if scenario.devices > 1 else run_chain(scenario, moments)
    return chain, check_chain(chain)


def _assert_exact(chain: Chain, outcome: Outcome) -> None:
    assert outcome.kills == len(chain.moments) == outcome.resumes + outcome.restarts
    assert outcome.final_equal, f"the final checkpoint differs at {outcome.differences}"
    assert outcome.tensors_compared > 100  # weights, Adam's moments and the EMA


def test_one_kill_per_phase_resumes_to_the_same_bits(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """12 steps (2 epochs), a checkpoint every 2 steps, validation every 3 batches; killed after a backward
    (steps 6-7 re-run), in validation (resumed at its step) and while ``last.ckpt`` is written (the previous
    one resumed)."""
    chain, outcome = _run(
        tmp_path,
        "image folder, 1 process (fast)",
        "folder",
        kills=3,
        seed=5,
        last_ckpt_saves=True,
        save_points=("write",),
    )
    _report(tmp_path_factory, outcome)
    assert sorted(m.phase for m in chain.moments) == ["save", "train", "val"]
    _assert_exact(chain, outcome)
    assert outcome.resume_steps == [2, 6, 10] and outcome.reread_steps == 5 and outcome.late_kills == 0
    assert outcome.samples_per_epoch == 12


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed", "workers"), [("folder", 1, 0), ("shards", 2, 2)])
def test_twelve_kills_per_data_module(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, kind: str, seed: int, workers: int
) -> None:
    """18 steps (3 epochs), 12 kills: 4 in training steps (their start, after the backward, after the
    optimiser step before its checkpoint), 4 in validation, 4 in checkpoint saves (the step's file or
    ``last.ckpt``, inside ``torch.save`` or in the bytes written to the folder). The shards are read by 2
    DataLoader workers (a resumed epoch's batches come round-robin from worker 0 again)."""
    name = f"{kind}, 1 process, {workers} workers"
    chain, outcome = _run(tmp_path, name, kind, num_workers=workers, max_steps=18, kills=12, seed=seed)
    _report(tmp_path_factory, outcome)
    assert sorted({m.phase for m in chain.moments}) == ["save", "train", "val"]
    _assert_exact(chain, outcome)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed"), [("folder", 18), ("shards", 19)])
def test_two_ddp_ranks_killed_anywhere_resume_to_the_same_bits(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, kind: str, seed: int
) -> None:
    """2 ranks (gloo, ``ddp_fork``), 3 batches per rank and epoch, 9 steps; 4 kills, the whole process group
    at once, pulled by either rank."""
    chain, outcome = _run(tmp_path, f"{kind}, 2 DDP ranks", kind, devices=2, max_steps=9, kills=4, seed=seed)
    _report(tmp_path_factory, outcome)
    _assert_exact(chain, outcome)
    assert outcome.samples_per_epoch == 12


@pytest.mark.slow
@pytest.mark.parametrize("lightning_io", [True, False])
def test_a_kill_while_last_ckpt_is_copied_in_leaves_it_loadable_only_with_tadms_io(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, lightning_io: bool
) -> None:
    """What the checks catch without tadm's atomic checkpoint IO: Lightning writes its temp file in the
    system temp folder and copies it over ``last.ckpt`` when that is on another filesystem (here
    ``/dev/shm``); a kill a byte into the copy leaves ``last.ckpt`` truncated, and the run cannot resume.
    tadm's IO writes beside ``last.ckpt`` and renames: the same kill leaves the previous one."""
    if not other_filesystem(tmp_path):
        pytest.skip("no second filesystem for the temp folder (/dev/shm)")
    kill = Moment(batch=3, phase="save", point="write", nth=2, fraction=0.0, file="last.ckpt")
    name = f"a kill in the copy to last.ckpt, {'Lightning' if lightning_io else 'tadm'}'s IO"
    if lightning_io:
        with pytest.raises(AssertionError, match="last.ckpt does not load"):
            _run(tmp_path, name, "folder", [kill], max_steps=6, lightning_io=True)
        return
    chain, outcome = _run(tmp_path, name, "folder", [kill], max_steps=6)
    _report(tmp_path_factory, outcome)
    assert outcome.resume_steps == [2] and outcome.late_kills == 0  # the kill fell inside the write
    _assert_exact(chain, outcome)
