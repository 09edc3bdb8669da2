"""A checkpoint's stored run config (the ``config`` of its ``tadm`` meta dict, YAML text) is checked for the
shape every reader relies on when the file is read: an export whose config is ``model: 5`` (or ``[]``, or
a component whose ``class_path`` is not a string) is one line naming the file, exit 2, from ``tadm upscale``,
``tadm export`` and ``TADMModel.from_export`` alike, not a ``TypeError`` from inside the rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tadm.commands.main import main
from tadm.errors import CheckpointError
from tadm.model.tadm_model import TADMModel
from tests.helpers import REPO

QUICKSTART = REPO / "assets" / "models" / "quickstart_x16.safetensors"


def _with_config(path: Path, config: str) -> Path:
    """The shipped quickstart model with its stored run config replaced by ``config``."""
    with safe_open(str(QUICKSTART), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    meta = json.loads(metadata["tadm"])
    meta["config"] = config
    save_file(tensors, str(path), metadata={**metadata, "tadm": json.dumps(meta)})
    return path


def _photo(root: Path) -> Path:
    path = root / "photos" / "p.png"
    path.parent.mkdir()
    Image.fromarray(np.full((40, 48, 3), 100, np.uint8)).save(path)
    return path


BAD_CONFIGS = {
    "model: 5": "the 'model' section of its stored run config is an int (5), not a mapping",
    "model: [1]": "the 'model' section of its stored run config is a list ([1]), not a mapping",
    "[]": "its stored run config is a list ([]), not a mapping of sections",
    "5": "its stored run config is an int (5), not a mapping of sections",
    "model: {class_path: 5}": "model.class_path in its stored run config is an int (5), not a class name",
    "model: {init_args: 3}": "model.init_args in its stored run config is an int (3), not a mapping",
    "model: {backbone: {class_path: 5}}": "model.backbone.class_path in its stored run config is an int (5)",
    "model: {rescaler: {class_path: x.Y, init_args: [1]}}": "model.rescaler.init_args in its stored run config is a list",
    "model: [": "its stored run config is not valid YAML",
    "model: {}": "holds no model config",
}  # fmt: skip


@pytest.mark.parametrize("config", list(BAD_CONFIGS))
def test_a_stored_config_of_the_wrong_shape_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str
) -> None:
    bad = _with_config(tmp_path / "bad.safetensors", config)
    photo, out = _photo(tmp_path), tmp_path / "out"
    for command in (
        ["upscale", "--ckpt", bad, photo, "-o", out / "hr"],
        ["export", bad, "-o", out / "x.safetensors"],
        ["export", bad, "--format", "onnx", "-o", out / "x.onnx"],
    ):
        code = main([str(c) for c in command])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, command
        assert len(err) == 1 and f"checkpoint {bad}" in err[0] and BAD_CONFIGS[config] in err[0], (
            command,
            err,
        )
    assert not out.exists() or not any(out.rglob("*"))
    with pytest.raises(CheckpointError, match="stored run config|holds no model config") as caught:
        TADMModel.from_export(bad)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_a_value_the_model_refuses_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jsonargparse's ``Parser key "model.scale":`` comes with the line after it, the reason."""
    with safe_open(str(QUICKSTART), framework="pt") as f:
        config = yaml.safe_load(json.loads(f.metadata()["tadm"])["config"])
    config["model"]["scale"] = "sixteen"
    bad = _with_config(tmp_path / "bad.safetensors", yaml.safe_dump(config))
    assert main(["upscale", "--ckpt", str(bad), str(_photo(tmp_path)), "-o", str(tmp_path / "hr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "Parser key \"model.scale\": Expected a <class 'int'>. Got value: sixteen" in err[0]
    )


def test_the_shipped_model_still_loads(tmp_path: Path) -> None:
    """The check lets a real stored config through (and its export round trip)."""
    assert main(["export", str(QUICKSTART), "-o", str(tmp_path / "q.safetensors"), "--dtype", "fp32"]) == 0
    assert TADMModel.from_export(tmp_path / "q.safetensors").scale == 16
