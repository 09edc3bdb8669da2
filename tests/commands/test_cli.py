"""The `tadm` command end to end: links hold, runs reproduce, checkpoints hold only what was trained, the
Lightning subcommands run on whole images (every shipped config runs in tests/config/test_configs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadm.commands.main import main
from tadm.testing.twins import twin_args
from tests.helpers import CONFIGS, VAL
from tests.helpers.cli import build_cli, data_args

QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every CLI call from an empty folder: nothing may be written into the repository."""
    monkeypatch.chdir(tmp_path)


_data = data_args
_cli = build_cli


def test_scale_and_latent_layout_linked_once() -> None:
    cli = _cli(["--config", QUICKSTART, "--model.scale=32", *_data(crop=64)])
    assert cli.model.scale == 32
    assert cli.model.rescaler.scale == 32
    assert cli.datamodule.scale == 32
    assert cli.model.rescaler.latent_channels == cli.model.backbone.latent_channels == 192
    cli = _cli(["--config", QUICKSTART, "--model.rescaler=bicubic", *_data(crop=64)])
    assert cli.model.rescaler.scale == 16  # a rescaler without latent arguments is simply not linked


def _run_short(tmp: Path, config: str, name: str) -> Path:
    main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps=3",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.limit_val_batches=1",
            "--data.init_args.train_repeats=1",
            f"--trainer.logger.init_args.save_dir={tmp / name}",
            "--trainer.callbacks="
            + json.dumps(
                [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"dirpath": str(tmp / name / "ckpt"), "save_last": True},
                    },
                    {"class_path": "tadm.training.callbacks.RoundTripReport"},
                ]
            ),
            *_data(),
        ]
    )
    return tmp / name


def test_saved_config_reruns_and_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run_short(tmp_path, QUICKSTART, "a")
    saved = first / "quickstart" / "version_0" / "config.yaml"
    assert saved.is_file(), list(first.rglob("*"))
    beside = first / "ckpt" / "config.yaml"  # also next to the checkpoints
    assert beside.is_file() and "class_path: tadm.components.rescalers.dfrm.DFRM" in beside.read_text()
    second = _run_short(tmp_path, str(saved), "b")
    a = torch.load(first / "ckpt" / "last.ckpt", weights_only=False)
    b = torch.load(second / "ckpt" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6)
    # the checkpoint carries the full config and the backbone it needs
    meta = a["tadm"]
    assert meta["backbone_id"] == "space_to_depth:8"
    assert "class_path: tadm.components.rescalers.dfrm.DFRM" in meta["config"]
    # and `validate` reads it back
    capsys.readouterr()
    main(["validate", "--config", str(saved), "--ckpt_path", str(first / "ckpt" / "last.ckpt"), *_data()])
    report = capsys.readouterr().out  # RoundTripReport: the model next to bicubic, and where things are
    assert "bicubic down + up" in report and "bicubic by" in report and "PSNR-Y" in report
    assert "Checkpoint:" in report


def test_checkpoint_holds_no_frozen_backbone_weights_and_checks_backbone(tmp_path: Path) -> None:
    exp = str(CONFIGS / "experiments" / "rescaler_x16.yaml")
    args = [
        "fit",
        "--config",
        exp,
        *twin_args("tiny-sd15"),
        "--model.rescaler.init_args.width=16",
        "--model.rescaler.init_args.num_resblocks=1",
        "--trainer.max_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks="
        + json.dumps(
            [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path), "save_last": True},
                }
            ]
        ),
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.num_workers=0",
        *_data(crop=64, batch=1),
    ]
    main(args)
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    ckpt = torch.load(ckpts[0], weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("rescaler.") for k in keys), [
        k for k in keys if not k.startswith("rescaler.")
    ]
    assert ckpt["tadm"]["backbone_id"].startswith("stable_diffusion:tiny-sd15")

    # weights-only init from that checkpoint works with the same backbone ...
    cli = _cli([*args[1:], f"--model.init_from={ckpts[0]}"])
    torch.testing.assert_close(
        cli.model.rescaler.state_dict(), {k[9:]: v for k, v in ckpt["state_dict"].items()}
    )
    # ... and fails clearly against another one
    bad = [a.replace("tiny-sd15", "tiny-sdxl") for a in args[1:]]
    with pytest.raises(ValueError, match=r"trained with backbone 'stable_diffusion:tiny-sd15.*tiny-sdxl"):
        _cli([*bad, f"--model.init_from={ckpts[0]}"])


def test_test_and_predict_subcommands_on_whole_images() -> None:
    """`tadm test` reports round-trip metrics on a folder; `predict` returns full-size outputs."""
    args = ["--config", QUICKSTART, *_data(), "--trainer.logger=false", "--trainer.callbacks=[]"]
    cli = _cli([*args, f"--data.init_args.test_dir={VAL}", f"--data.init_args.predict_dir={VAL}"])
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert {"test/psnr_y", "test/ssim_y", "test/bicubic_psnr_y", "test/lr_psnr"} <= set(results[0])
    preds = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    from tadm.datamodules.image_io import load_image

    assert len(preds) == 2
    for out in preds:
        hr = load_image(out["path"][0])
        assert out["reconstruction"].shape[-2:] == hr.shape[-2:]  # padded for the model, cropped back
        assert out["lr"].shape[-2:] == (-(-hr.shape[-2] // 16), -(-hr.shape[-1] // 16))


def test_metrics_command_has_its_own_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`tadm evaluate` is the metrics command; `tadm test` is always LightningCLI's test loop."""
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--ckpt" in out and "--no-perceptual" in out
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "--no-perceptual" not in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.scale=7", "scale must be a power of two"),
        ("--data.init_args.crop_size=100", "crop_size=100 must be a positive multiple of 16"),
        ("--model.rescaler=nosuch", "unknown rescaler 'nosuch'; registered rescalers: bicubic, dfrm, irn"),
    ],
)
def test_bad_configuration_values_are_short_errors_with_exit_2(
    override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["fit", "--config", QUICKSTART, *_data(), "--trainer.fast_dev_run=1", override])
    except SystemExit as exit_:  # jsonargparse's own usage errors exit 2 themselves
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_one_logger_flag_moves_logs_checkpoints_and_config(tmp_path: Path) -> None:
    """`--trainer.logger.init_args.save_dir` alone moves the TensorBoard run, last.ckpt and config.yaml: the
    quickstart's checkpoint folder is the logger's `<save_dir>/<name>/checkpoints`."""
    elsewhere = tmp_path / "elsewhere"
    code = main(
        [
            "fit",
            "--config",
            QUICKSTART,
            f"--trainer.logger.init_args.save_dir={elsewhere}",
            "--trainer.max_steps=4",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.train_repeats=1",
            "--model.rescaler.init_args.width=32",
            "--model.rescaler.init_args.num_resblocks=1",
            "--model.rescaler.init_args.num_couplings=2",
            *_data(batch=2),
        ]
    )
    assert code == 0
    run = elsewhere / "quickstart"
    assert list((run / "version_0").glob("events.out.tfevents.*"))
    assert (run / "version_0" / "config.yaml").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    beside = (run / "checkpoints" / "config.yaml").read_text()
    assert "class_path: tadm.components.rescalers.dfrm.DFRM" in beside
    assert not (tmp_path / "runs").exists()  # nothing in the configured default place
