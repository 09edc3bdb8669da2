"""Every YAML under configs/ is found and run (shrunk), so the configs users run are tested configs.

Nothing here lists config files: a new file is picked up by its folder's rule. ``experiments/`` and
``quickstart.yaml`` are complete recipes (each experiment runs once per backbone family, on the family's
tiny twin); ``backbone/``, ``aligner/``, ``rescaler/``, ``ablation/``, ``debug/``, ``data/`` and
``hardware/`` files are composed onto a recipe. A new aligner or rescaler is one module and one YAML, nothing else to edit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from tadm.commands.main import main
from tadm.components.backbones.flow_transformers.flow_presets import FLOW_PRESETS
from tadm.components.backbones.stable_diffusion.unet_presets import PRESETS
from tadm.config.plugins import load_plugins
from tadm.contracts import ALIGNERS, RESCALERS
from tadm.testing.twins import TWIN_CLASS_PATHS, twin_args
from tests.helpers import CONFIGS, TRAIN, VAL
from tests.helpers.cli import build_cli, data_args, fit_and_check, one_cpu_quiet_args, stage_args

QUICKSTART = str(CONFIGS / "quickstart.yaml")
PHOTOS_TRAIN = str(CONFIGS.parent / "assets" / "photos" / "train")
CONFIG_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
RULES = (
    "quickstart.yaml", "experiments", "backbone", "aligner", "rescaler", "ablation", "debug", "data", "studies",
    "hardware", "shipped",
)  # fmt: skip
#: studies/: study files (`tadm study`), whose every cell tests/studies/test_study.py builds
#: shipped/: the recipes of the shipped models, composed onto quickstart.yaml (below: each trains a step;
#: tests/model/test_shipped_models.py: the shipped files match them)
#: hardware/: settings for one kind of machine, composed onto the stage-2 recipe (below); what the one-GPU
#: file promises (effective batch, gradient checkpointing in diffusers) is checked in tests/training/test_one_gpu.py


def _files(folder: str) -> list[str]:
    return [f for f in CONFIG_FILES if f.startswith(folder + "/")]


def _yaml(rel: str) -> dict:
    return yaml.safe_load((CONFIGS / rel).read_text()) or {}


def _preset(rel: str) -> str | None:
    return ((_yaml(rel).get("model") or {}).get("backbone") or {}).get("init_args", {}).get("preset")


#: every named preset: the UNet families' and the DiT families' (SD 3, FLUX)
ALL_PRESETS = {**PRESETS, **FLOW_PRESETS}
#: one backbone file per family: the experiments run on each family's tiny twin
FAMILY_FILES = {ALL_PRESETS[p].family: f for f in reversed(_files("backbone")) if (p := _preset(f))}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every CLI call from an empty folder: nothing may be written into the repository."""
    monkeypatch.chdir(tmp_path)


def test_every_config_file_has_a_rule() -> None:
    assert "quickstart.yaml" in CONFIG_FILES and _files("experiments")
    for rel in CONFIG_FILES:
        assert rel.split("/")[0] in RULES, (
            f"configs/{rel}: no rule in tests/config/test_configs.py for its folder"
        )


@pytest.mark.parametrize("phases", [1, 2], ids=["photos_x16", "photos_x16_finetune"])
def test_the_shipped_recipe_trains_a_step(phases: int, tmp_path: Path) -> None:
    """`make shipped-model`'s two `tadm fit` calls, one step each, phase 2 starting from phase 1's checkpoint."""
    files = [QUICKSTART, str(CONFIGS / "shipped" / "photos_x16.yaml")]
    photos = [f"--data.init_args.train_dir={PHOTOS_TRAIN}", f"--data.init_args.val_dir={VAL}"]  # run from tmp
    extra = []
    if phases == 2:
        files.append(str(CONFIGS / "shipped" / "photos_x16_finetune.yaml"))
        first = build_cli(["--config", files[0], "--config", files[1], "--trainer.fast_dev_run=1", *photos])
        first.trainer.fit(first.model, datamodule=first.datamodule)
        ckpt = tmp_path / "phase1.ckpt"
        first.trainer.save_checkpoint(ckpt)
        extra = [f"--model.init_from={ckpt}"]
        assert yaml.safe_load((CONFIGS / "shipped" / "photos_x16_finetune.yaml").read_text())["model"][
            "init_from"
        ]
    cli = build_cli(
        [a for f in files for a in ("--config", f)] + ["--trainer.fast_dev_run=1", *photos, *extra]
    )
    done = fit_and_check(cli)
    assert all(n.startswith("rescaler.") for n in done["trainable"])
    assert cli.model.loss_weights["lr"] == (4.0 if phases == 2 else 1.0)
    # phase 2 fine-tunes on mostly faint crops (docs/shipped_model.md); phase 1 on the photos as they are
    data = cli.datamodule.datasets["train"]
    assert (data.augment.low_contrast_fraction, data.augment.low_contrast_min) == (
        (0.9, 1 / 128) if phases == 2 else (0.0, 1 / 16)
    )


def test_every_backbone_family_has_a_tiny_twin() -> None:
    assert set(FAMILY_FILES) == {"sd15", "sd21", "sdxl", "sd3", "flux"}
    for family in FAMILY_FILES:
        assert f"tiny-{family}" in TWIN_CLASS_PATHS, (
            f"family {family} needs a tiny-{family} preset for the config tests"
        )


def test_quickstart_trains_a_step_and_reports_both_round_trips() -> None:
    cli = build_cli(["--config", QUICKSTART, "--trainer.fast_dev_run=1", *data_args()])
    done = fit_and_check(cli)
    assert all(n.startswith("rescaler.") for n in done["trainable"])
    metrics = cli.trainer.callback_metrics
    assert 5 < metrics["val/psnr_y"] < 60 and 5 < metrics["val/bicubic_psnr_y"] < 60


def _backbone_free(rel: str) -> bool:
    """A stage-1 recipe of a pixel-space rescaler (IRN): no part of it depends on the backbone."""
    load_plugins()
    model = _yaml(rel)["model"]
    rescaler = RESCALERS.get(model["rescaler"]["class_path"])
    return model.get("stage", "rescaler") == "rescaler" and rescaler.space == "pixel"


def _experiment_cases() -> list:
    """Every experiment on every family. In `make test`: on SD 2.1 every recipe but IRN's (it trains the full-size
    IRN for ~25 s: tests/components/test_irn.py trains it directly), the release's stage 2/3 and stages 2 and 3
    x32 (settings of recipes that run), and on the other UNet families
    the stage-3 x16 recipe on SDXL (it trains what stages 1 and 2 train, together). The rest (the authors'
    release recipes, SD 2.1 by definition; the recipes no backbone takes part in, :func:`_backbone_free`; x32,
    which differs in the rescaler; stages 1 and 2 alone on SDXL; every recipe on SD 1.5, whose UNet, VAE and
    text encoder are SD 2.1's classes: tests/components/test_backbone_enhancer.py trains it) run with the slow
    tests."""
    return [
        pytest.param(
            e,
            f,
            marks=[pytest.mark.slow]
            if ((e.startswith("experiments/release/") or _backbone_free(e) or "_x32" in e) and f != "sd21")
            or _dit_slow(e, f)
            or _unet_slow(e, f)
            else [],
        )
        for e in _files("experiments")
        for f in sorted(FAMILY_FILES)
    ]


def _unet_slow(experiment: str, family: str) -> bool:
    """See :func:`_experiment_cases`: on SD 2.1 IRN's, the release's stage 2/3 and the x32 stages 2/3; on
    SDXL all but stage 3 x16; on SD 1.5 all."""
    if family in {p.family for p in FLOW_PRESETS.values()}:
        return False
    if (
        family == "sd21"
    ):  # the release's stage 2/3 and the stage-3 x32 recipe differ from x16 in settings only
        return experiment in {
            "experiments/irn_x16.yaml",
            "experiments/release/enhancer_x16.yaml",
            "experiments/release/joint_x16.yaml",
            "experiments/joint_x32.yaml",
            "experiments/enhancer_x32.yaml",  # x16's stage 2 at another scale; rescaler_x32 keeps x32 fast
        }
    return family == "sd15" or experiment != "experiments/joint_x16.yaml"


def _dit_slow(experiment: str, family: str) -> bool:
    """The DiT twins (SD 3, FLUX) run the stage-1 x16 recipe in the fast suite, the rest with the slow tests:
    tests/components/test_backbone_sd3.py and test_backbone_flux.py train every stage (and x32) directly, so the
    recipes' stage 2/3 on them would add ~1 minute to `make test` for no new coverage."""
    fast = {"experiments/rescaler_x16.yaml"}
    return family in {p.family for p in FLOW_PRESETS.values()} and experiment not in fast


@pytest.mark.parametrize(("experiment", "family"), _experiment_cases())
def test_experiment_trains_a_step_on_each_family(experiment: str, family: str, small_val: Path) -> None:
    """The full-size recipe itself, its backbone swapped by the family's YAML and shrunk to the tiny twin,
    no previous-stage checkpoint; one step trains exactly the stage's parts (see ``fit_and_check``)."""
    stage = _yaml(experiment)["model"].get("stage", "rescaler")
    shrink = [] if stage == "rescaler" else ["--model.init_from=null", "--trainer.precision=32-true"]
    shrink.append("--model.backbone.init_args.vae=null")  # a hub VAE (the release's) has no tiny twin
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / experiment),
            "--config",
            str(CONFIGS / FAMILY_FILES[family]),
            *twin_args(f"tiny-{family}"),
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--data.init_args.num_workers=0",
            *shrink,
            *data_args(crop=64, batch=1, val=small_val),
        ]
    )
    assert cli.model.stage == stage and cli.model.backbone.preset.family == family
    done = fit_and_check(cli)
    parts = {n.split(".")[0] for n in done["changed"]}
    expected = {
        "rescaler": {"rescaler"},
        "enhancer": {"backbone", "enhancer"},
        "joint": {"rescaler", "backbone"},
    }
    assert expected[stage] <= parts, parts
    assert ("rescaler" in parts) == (stage != "enhancer")


@pytest.mark.parametrize("backbone", _files("backbone"))
def test_backbone_file_parses_without_weights(backbone: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Full-size presets and the VAE swap parse (``--print_config``) without touching weights."""
    with pytest.raises(SystemExit):  # --print_config prints and exits
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "experiments" / "rescaler_x16.yaml"),
                "--config",
                str(CONFIGS / backbone),
                "--model.backbone.init_args.pretrained=/weights/elsewhere",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["backbone"]["init_args"]
    for key, value in _yaml(backbone)["model"]["backbone"].get("init_args", {}).items():
        assert printed[key] == value
    assert printed["pretrained"] == "/weights/elsewhere"


#: in `make test` one aligner file and one fixed-t ablation train a step (~9 s / ~5 s each); the others run with
#: the slow tests (every built-in aligner also runs a stage step in tests/testing/test_contract_checks.py)
FAST_ALIGNER_FILES = {"aligner/tpm.yaml"}
FAST_ABLATION_FILES = {"ablation/pixel_prior.yaml", "ablation/fixed_t50.yaml", "ablation/no_prior.yaml"}


def _fast_or_slow(files: list[str], fast: set[str]) -> list:
    return [pytest.param(f, marks=[] if f in fast else [pytest.mark.slow]) for f in files]


@pytest.mark.parametrize("aligner", _fast_or_slow(_files("aligner"), FAST_ALIGNER_FILES))
def test_aligner_file_swaps_the_aligner_and_trains_a_step(aligner: str, small_val: Path) -> None:
    """Composed onto stage 2 (tiny SD 2.1): the YAML's short name picks the class, one step trains it,
    validation runs (the oracle gets the HR latent there)."""
    extra = ["--config", str(CONFIGS / aligner), "--trainer.max_steps=1"]
    extra += ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=1"]
    cli = build_cli(stage_args(extra=[*extra, f"--data.init_args.val_dir={small_val}"]))
    assert type(cli.model.aligner) is ALIGNERS.get(_yaml(aligner)["model"]["aligner"]["class_path"])
    done = fit_and_check(cli)
    has_params = any(p.requires_grad for p in cli.model.aligner.parameters())
    assert any(n.startswith("aligner.") for n in done["changed"]) == has_params
    assert torch.isfinite(cli.trainer.callback_metrics["val/psnr_y"])
    assert not cli.model.rescaler.training  # stage 2 keeps the frozen rescaler in eval mode


@pytest.mark.parametrize("rescaler", _files("rescaler"))
def test_rescaler_file_swaps_the_rescaler_and_trains_a_step(rescaler: str) -> None:
    """Composed onto stage 1 (``experiments/rescaler_x16.yaml``, tiny SD 2.1): the YAML's short name picks the
    class, its loss weights cover the terms it returns, and one step trains the rescaler alone."""
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "experiments" / "rescaler_x16.yaml"),
            "--config",
            str(CONFIGS / rescaler),
            *twin_args("tiny-sd21"),
            "--trainer.max_steps=1",
            *one_cpu_quiet_args(),
            "--data.init_args.num_workers=0",
            *data_args(crop=64, batch=1),
        ]
    )
    assert type(cli.model.rescaler) is RESCALERS.get(_yaml(rescaler)["model"]["rescaler"]["class_path"])
    done = fit_and_check(cli)
    assert {n.split(".")[0] for n in done["changed"]} == {"rescaler"}


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Dotted keys and values of a YAML mapping (lists and class choices are leaves)."""
    out: list[tuple[str, object]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and "class_path" not in value and key != "loss_weights":
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


@pytest.mark.parametrize("ablation", _fast_or_slow(_files("ablation"), FAST_ABLATION_FILES))
def test_ablation_file_composes_onto_stage_2_and_trains_a_step(ablation: str) -> None:
    """Composed onto stage 2 (``experiments/enhancer_x16.yaml``, tiny SD 2.1, slim DFRM, no previous
    checkpoint): every value of the file reaches the model, and one step trains exactly its stage's parts."""
    extra = ["--config", str(CONFIGS / ablation), "--model.init_from=null", "--trainer.max_steps=1"]
    cli = build_cli(stage_args(extra=extra))
    model = cli.model
    for key, value in _leaves(_yaml(ablation)):
        section, name = key.split(".", 1)
        if key == "model.init_from":
            continue  # the previous stage's run, replaced by null here
        if section == "trainer":
            assert cli.config["trainer"][name] == value, key
        elif isinstance(value, dict) and "class_path" in value:  # the registered class, with its init_args
            registry = {"aligner": ALIGNERS, "rescaler": RESCALERS}[name]
            part = getattr(model, name)
            assert type(part) is registry.get(value["class_path"]), key
            for arg, want in (value.get("init_args") or {}).items():
                assert getattr(part, arg) == want, f"{key}.init_args.{arg}"
        else:
            assert getattr(model, name) == value, key
    done = fit_and_check(cli)
    parts = {n.split(".")[0] for n in done["changed"]}
    expected = {"rescaler": {"rescaler"}, "enhancer": {"backbone", "enhancer"}}
    assert expected[model.stage] <= parts, parts
    assert ("rescaler" in parts) == (model.stage != "enhancer")


@pytest.mark.parametrize("debug", _files("debug"))
def test_debug_file_composes_with_quickstart(debug: str) -> None:
    cli = build_cli(["--config", QUICKSTART, "--config", str(CONFIGS / debug), *data_args()])
    for key, value in _yaml(debug)["trainer"].items():
        assert cli.config["trainer"][key] == value, key
    cli = build_cli(
        ["--config", QUICKSTART, "--config", str(CONFIGS / debug), "--trainer.fast_dev_run=1", *data_args()]
    )
    fit_and_check(cli)


def _flat(doc: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


#: hardware files whose one optimiser step takes minutes on a CPU (bf16 autocast, 8 accumulated micro-batches
#: with gradient checkpointing: ~110 s): their fit runs with the slow tests, their composition always
SLOW_HARDWARE_FITS = {"hardware/one_gpu_24gb.yaml"}


def _hardware_cases() -> list:
    return [
        pytest.param(h, marks=[pytest.mark.slow] if h in SLOW_HARDWARE_FITS else [])
        for h in _files("hardware")
    ]


def _check_hardware_composes(hardware: str, capsys: pytest.CaptureFixture[str]) -> LightningCLI | None:
    """Every value the file sets reaches the parsed config; a class from an optional package that is not
    installed (bitsandbytes) fails at parse time naming the package (then None)."""
    flat = _flat(_yaml(hardware))
    packages = {v.split(".")[0] for k, v in flat.items() if k.endswith("class_path") and "." in str(v)}
    missing = sorted(p for p in packages if importlib.util.find_spec(p) is None)
    args = stage_args(extra=["--config", str(CONFIGS / hardware), "--trainer.max_steps=1"])
    if missing:
        with pytest.raises(SystemExit):
            build_cli(args)
        err = capsys.readouterr().err
        assert all(f"No module named '{p}'" in err for p in missing), err[-2000:]
        return None
    cli = build_cli(args)
    for key, value in flat.items():
        parsed = cli.config[key]
        assert (list(parsed) if isinstance(parsed, tuple) else parsed) == value, key
    return cli


@pytest.mark.parametrize("hardware", sorted(SLOW_HARDWARE_FITS))
def test_hardware_file_composes_onto_stage_2(hardware: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The fast half of the next test, for the files whose fit is slow."""
    _check_hardware_composes(hardware, capsys)


@pytest.mark.parametrize("hardware", _hardware_cases())
def test_hardware_file_composes_onto_stage_2_and_trains(
    hardware: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Composed after the shrunk stage-2 recipe (tiny SD 2.1), every value the file sets reaches the parsed
    config and one optimiser step trains with all of them (bf16-mixed, accumulation and all); a class from an
    optional package that is not installed (bitsandbytes) fails at parse time naming the package."""
    cli = _check_hardware_composes(hardware, capsys)
    if cli is not None:
        fit_and_check(cli)


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled photos packed as shard sets (``tadm shard``)."""
    from tadm.datamodules.shard_writer import pack_shards

    root = tmp_path_factory.mktemp("shards")
    pack_shards(TRAIN, root / "train")
    pack_shards(VAL, root / "val")
    return {"train": root / "train", "val": root / "val"}


#: what each data module needs besides its YAML to run on the bundled photos
DATA_ARGS = {
    "WebDatasetDataModule": lambda shards: [
        f"--data.init_args.train_shards={shards['train']}",
        f"--data.init_args.val_shards={shards['val']}",
        "--data.init_args.crop_size=64",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ],
}


@pytest.mark.parametrize("data", _files("data"))
def test_data_file_feeds_the_quickstart(data: str, sample_shards: dict[str, Path]) -> None:
    class_path = _yaml(data)["data"]["class_path"]
    assert class_path in DATA_ARGS, f"configs/{data}: add how to feed {class_path} to DATA_ARGS"
    args = ["--config", QUICKSTART, "--config", str(CONFIGS / data), "--trainer.fast_dev_run=1"]
    cli = build_cli([*args, *DATA_ARGS[class_path](sample_shards)])
    assert type(cli.datamodule).__name__ == class_path.rsplit(".", 1)[-1]
    fit_and_check(cli)
    assert torch.isfinite(cli.trainer.callback_metrics["val/psnr_y"])
