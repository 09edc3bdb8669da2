"""Start-up: ``tadm --help``, ``tadm list`` and the codec on the shipped quickstart model (the embedded
``space_to_depth`` backbone) import neither Lightning nor diffusers, transformers or peft, in a fresh
process (``sys.modules`` after the command; the time they save is ``benchmarks/startup.py``'s, never
asserted here). And what they skip loses nothing: ``tadm --help`` names every command, ``tadm list`` every
plug-in, and the codec's model is the plain :class:`~tadm.model.TADMModel` the training module wraps,
tensor for tensor and output for output.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tadm.commands.main import COMMANDS, LIGHTNING_COMMANDS, main
from tadm.contracts import ALL_REGISTRIES
from tadm.errors import CheckpointError
from tadm.model import TADMModel
from tadm.model.checkpoints import read_checkpoint
from tadm.training.lightning_module import TADMModule
from tests.helpers import REPO

QUICKSTART = REPO / "assets" / "models" / "quickstart_x16.safetensors"
#: what none of the three may import: each costs seconds (Lightning pulls torchmetrics, torchvision, scipy)
HEAVY = ("lightning", "pytorch_lightning", "diffusers", "transformers", "peft", "torchmetrics", "torchvision")
MARK = "TADM-STARTUP-MODULES="


def run_fresh(code: str, cwd: Path) -> tuple[str, set[str]]:
    """Run ``code`` in a new interpreter; its stdout and the top-level packages it had imported at the end."""
    tail = f"\nimport sys as _s\nprint({MARK!r} + __import__('json').dumps(sorted({{m.split('.')[0] for m in _s.modules}})))"
    done = subprocess.run(
        [sys.executable, "-c", code + tail],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out, _, modules = done.stdout.rpartition(MARK)
    return out, set(json.loads(modules))


def test_help_imports_neither_lightning_nor_torch_and_names_every_command(tmp_path: Path) -> None:
    out, modules = run_fresh("from tadm.commands.main import main\nassert main(['--help']) == 0", tmp_path)
    assert not modules & {*HEAVY, "torch"}, sorted(modules & {*HEAVY, "torch"})
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == {*COMMANDS, *LIGHTNING_COMMANDS}
    for name, cmd in COMMANDS.items():
        assert f"  {name}" in out and cmd.summary in out


def test_list_imports_no_heavy_package_and_names_every_builtin_plugin(tmp_path: Path) -> None:
    out, modules = run_fresh("from tadm.commands.main import main\nassert main(['list']) == 0", tmp_path)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    rows = [line for line in out.splitlines() if "tadm.components." in line]
    builtins = [
        (registry.kind, name, cls)
        for registry in ALL_REGISTRIES
        for name, cls in registry.items()
        if cls.__module__.startswith("tadm.components.")
    ]
    assert {"dfrm", "bicubic", "space_to_depth", "stable_diffusion", "tpm"} <= {n for _, n, _ in builtins}
    for kind, name, cls in builtins:
        path = f"{cls.__module__}.{cls.__qualname__}"
        assert any(kind in row and f" {name} " in row and path in row for row in rows), (kind, name)
    assert len(rows) == len(builtins)


@pytest.mark.parametrize("command", ["evaluate", "downscale", "upscale"])
def test_a_commands_help_imports_no_heavy_package(command: str, tmp_path: Path) -> None:
    """`tadm evaluate --help` took 6 s: the protocol names came with torchmetrics (and scipy)."""
    code = (
        "from tadm.commands.main import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
    )
    out, modules = run_fresh(code, tmp_path)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert f"tadm {command}" in out and "--ckpt" in out
    if command == "evaluate":
        assert "--protocol {tadm,pyiqa,basicsr}" in out


def test_the_codec_on_the_quickstart_model_imports_no_heavy_package(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    code = (
        "from tadm.commands.main import main\n"
        f"q = {str(QUICKSTART)!r}\n"
        "assert main(['downscale', '--ckpt', q, 'photo.png', '-o', 'lr', '--no-progress']) == 0\n"
        "assert main(['upscale', '--ckpt', q, 'lr', '-o', 'hr', '--no-progress']) == 0\n"
    )
    _, modules = run_fresh(code, tmp_path)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    (restored,) = (tmp_path / "hr").iterdir()
    with Image.open(restored) as img:
        assert img.size == (80, 48)


def _training_module(config: str) -> TADMModule:
    """The LightningModule a run config describes, built as ``tadm fit`` builds it (no losses)."""
    from lightning.pytorch.cli import LightningArgumentParser

    from tadm.config.build import link_model_arguments
    from tadm.config.plugins import load_plugins

    load_plugins(data=False)
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(TADMModule, "model")
    link_model_arguments(parser, with_data=False)
    model_cfg = {**yaml.safe_load(config)["model"], "loss_weights": {}}
    for key in ("optimizer", "lr_scheduler"):
        model_cfg.pop(key, None)
    module = parser.instantiate(parser.parse_object({"model": model_cfg})).model
    module.configure_model()
    return module


def test_the_codec_model_is_the_one_the_training_module_wraps() -> None:
    """Same tensors under the same names, the same trainable set, checks and outputs; and a checkpoint the
    training module writes holds exactly the plain model's trained tensors under the model's own names."""
    state, meta = read_checkpoint(QUICKSTART)
    plain = TADMModel.from_config(meta["config"], "quickstart")
    module = _training_module(meta["config"])
    full = module.model
    assert type(plain) is type(full) is TADMModel
    for model in (plain, full):
        model.load_trained_state(state, "quickstart")
        model.check_compatible(meta, "quickstart")
        model.eval()
    assert plain.state_dict().keys() == full.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key
    assert [n for n, _ in plain.named_trainable_parameters()] == [
        n for n, _ in module.named_trainable_parameters()
    ]
    assert plain.frozen_keys() == full.frozen_keys()
    assert (plain.stage, plain.scale, plain.aligner, plain.enhance_fn) == (
        module.stage,
        module.scale,
        None,
        None,
    )
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == state.keys()
    assert checkpoint["tadm"] == {**plain.checkpoint_meta(None), "config": None}
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        y = plain.downscale(x)
        assert torch.equal(y, full.rescaler.downscale(x, full.backbone.encode(x)))
        assert torch.equal(plain.upscale(y), full.backbone.decode(full.rescaler.upscale(y)))


def test_every_command_in_the_help_table_exists_and_the_lightning_names_are_lightnings() -> None:
    from lightning.pytorch.cli import LightningCLI

    for name, cmd in COMMANDS.items():
        module, _, function = cmd.target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert cmd.summary and "\n" not in cmd.summary, name
    assert set(LIGHTNING_COMMANDS) == set(LightningCLI.subcommands())
    assert not set(COMMANDS) & set(LIGHTNING_COMMANDS)


def test_help_and_a_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    assert "list" in capsys.readouterr().out
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: tadm COMMAND" in err and "a command is required" in err


def test_a_config_with_an_aligner_builds_the_plain_model_too(tmp_path: Path) -> None:
    """Any stage's config builds the plain model, none of them through Lightning (one class per job)."""
    _, meta = read_checkpoint(QUICKSTART)
    cfg = yaml.safe_load(meta["config"])
    cfg["model"]["aligner"] = {"class_path": "fixed"}
    config = yaml.safe_dump(cfg)
    model = TADMModel.from_config(config, "quickstart + aligner")
    assert type(model) is TADMModel and type(model.aligner).__name__ == "FixedTimestep"
    code = f"from tadm.model import TADMModel\nTADMModel.from_config({config!r}, 'q')\n"
    _, modules = run_fresh(code, tmp_path)
    assert not modules & {"lightning", "pytorch_lightning"}, sorted(modules & set(HEAVY))


def _outcome(call: Callable[[], None]) -> str:
    try:
        call()
    except CheckpointError as err:
        return str(err)
    return "accepted"


@pytest.mark.parametrize("rescaler", ["stored", "bicubic"])
def test_the_plain_model_accepts_and_refuses_what_the_training_module_does(rescaler: str) -> None:
    """Differential: the same checkpoint metadata and tensors, each with the same verdict and message from
    the codec's model and the training module's, for the quickstart's latent DFRM and for a pixel
    rescaler (whose stage-1 checkpoints fit any backbone)."""
    state, meta = read_checkpoint(QUICKSTART)
    cfg = yaml.safe_load(meta["config"])
    if rescaler != "stored":
        cfg["model"]["rescaler"] = {"class_path": rescaler}
        state = {}
    config = yaml.safe_dump(cfg)
    plain, full = TADMModel.from_config(config, "q"), _training_module(config)
    metas = [
        meta,
        None,
        {**meta, "backbone_id": "other"},
        {**meta, "backbone_id": "other", "stage": "enhancer"},
        {**meta, "scale": 32},
        {**meta, "scale": None},
    ]
    states = [state, {**state, "aligner.w": torch.zeros(1)}]
    if state:
        first = next(iter(state))
        states += [{k: v for k, v in state.items() if k != first}, {**state, first: torch.zeros(1)}]
    verdicts = []
    for m in metas:
        verdicts.append(_outcome(lambda m=m: plain.check_compatible(m, "q")))
        assert verdicts[-1] == _outcome(lambda m=m: full.check_compatible(m, "q")), m
    for st in states:
        verdicts.append(_outcome(lambda st=st: plain.load_trained_state(st, "q")))
        assert verdicts[-1] == _outcome(lambda st=st: full.model.load_trained_state(st, "q")), sorted(st)[:3]
    # the cases are not vacuous: both verdicts occur, and the pixel rescaler ignores the backbone
    assert "accepted" in verdicts and any("has weights this model does not" in v for v in verdicts)
    other_backbone = verdicts[2]
    assert (other_backbone == "accepted") == (rescaler == "bicubic")
