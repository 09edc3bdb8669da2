"""The one-GPU stage-2 recipe (configs/hardware/one_gpu_24gb.yaml, adamw_8bit.yaml) keeps the recipes'
effective batch, really turns gradient checkpointing on in the built diffusers modules, and the optional
8-bit AdamW keeps its moments in 8 bits where bitsandbytes is installed (``pip install 'tadm[bnb]'``).

tests/config/test_configs.py composes every ``configs/hardware/`` file onto stage 2 and trains a step with it (or,
without bitsandbytes, checks that adamw_8bit.yaml fails naming the package);
the memory numbers are benchmarks/train_memory.py's (benchmarks/README.md "One-GPU recipe").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import CONFIGS
from tests.helpers.cli import build_cli, fit_and_check, stage_args

ONE_GPU = CONFIGS / "hardware" / "one_gpu_24gb.yaml"
ADAMW_8BIT = CONFIGS / "hardware" / "adamw_8bit.yaml"
STAGE2_RECIPES = ["experiments/enhancer_x16.yaml", "experiments/release/enhancer_x16.yaml"]
#: the recipes' effective batch: 2 crops x accumulate 4 on the release's 2 GPUs (their header comments)
RECIPE_GPUS = 2


def _yaml(path) -> dict:  # type: ignore[no-untyped-def]
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("recipe", STAGE2_RECIPES)
def test_one_gpu_keeps_the_recipes_effective_batch(recipe: str) -> None:
    base, hw = _yaml(CONFIGS / recipe), _yaml(ONE_GPU)
    effective = (
        base["data"]["init_args"]["batch_size"] * base["trainer"]["accumulate_grad_batches"] * RECIPE_GPUS
    )
    assert effective == 16  # the number docs/reproducing.md and the recipes' comments give
    one_gpu = hw["data"]["init_args"]["batch_size"] * hw["trainer"]["accumulate_grad_batches"]
    assert hw["trainer"]["devices"] == 1 and one_gpu == effective
    assert hw["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.slow  # ~11 s of a `make test` worker (kept under its 10 minutes); run by `make test-all`
def test_one_gpu_turns_gradient_checkpointing_on_in_diffusers() -> None:
    """stage_args switches checkpointing off (fast tests); the hardware file composed after it turns it on,
    and the flag reaches the UNet and the VAE (decoder) diffusers build."""
    cli = build_cli(stage_args(extra=["--config", str(ONE_GPU), "--trainer.precision=32-true"]))
    backbone = cli.model.backbone
    assert backbone.gradient_checkpointing is True
    assert backbone.unet.is_gradient_checkpointing and backbone.vae.is_gradient_checkpointing
    assert cli.trainer.accumulate_grad_batches == 8
    assert cli.datamodule.batch_size == 2
    off = build_cli(stage_args())
    assert not off.model.backbone.unet.is_gradient_checkpointing  # the flag is not on by default


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (tests/config/test_configs.py checks the error naming it instead)",
)
def test_adamw_8bit_trains_with_8bit_states() -> None:
    cli = build_cli(
        stage_args(
            extra=[
                "--config",
                str(ADAMW_8BIT),
                "--trainer.max_steps=1",
                "--trainer.enable_progress_bar=false",
            ]
        )
    )
    fit_and_check(cli)
    opt = cli.trainer.optimizers[0]
    assert type(opt).__module__.startswith("bitsandbytes.")
    states = [s["state1"] for s in opt.state.values() if "state1" in s]
    assert states and any(s.dtype == torch.uint8 for s in states)


def test_tadm_fit_names_a_missing_optional_package_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without bitsandbytes, `tadm fit ... --config adamw_8bit.yaml` exits 2 with one line naming the file,
    the key and tadm's extra (before: jsonargparse's whole usage, then a Union-subtype report)."""
    from tadm.commands.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    eight_bit = CONFIGS / "hardware" / "adamw_8bit.yaml"
    recipe = [f"--config={CONFIGS / 'experiments' / 'enhancer_x16.yaml'}", "--config", str(eight_bit)]
    assert main(["fit", *recipe, "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{eight_bit}: model.optimizer.class_path 'bitsandbytes.optim.AdamW8bit'" in err
    assert "needs the Python package 'bitsandbytes'" in err and "pip install 'tadm[bnb]'" in err
    plug_in = tmp_path / "plug_in.yaml"
    plug_in.write_text("model:\n  aligner:\n    class_path: tadm_no_such_pkg.aligners.Mine\n")
    assert main(["fit", "-c", str(plug_in)]) == 2
    err = capsys.readouterr().err
    assert (
        "model.aligner.class_path 'tadm_no_such_pkg.aligners.Mine'" in err
        and "pip install tadm_no_such_pkg" in err
    )
