"""A pickle whose loading would run code (``os.system``, ``eval``, ``subprocess.Popen``, a class of one's own)
is refused without running anything, in one line that names the object, by every reader of one: the
checkpoint reader (``--ckpt``, ``tadm export``) and ``tadm import-release`` (``--dfrm``, ``--tadm``).

``tadm fit|validate --ckpt_path`` and ``model.init_from``: ``tests/training/test_unsafe_ckpt.py``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadm.commands.main import main
from tadm.errors import CheckpointError
from tadm.model.checkpoints import read_checkpoint, refused_object
from tadm.model.release_import import read_release_files
from tests.helpers.pickles import FORMATS, PAYLOADS, write_evil
from tests.helpers.release import release_dfrm_state


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_the_refusal_names_the_object_and_nothing_runs(tmp_path: Path, payload: str, fmt: str) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    name = write_evil(evil, payload, marker, fmt)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(evil)
    line = str(caught.value)
    assert line.startswith(f"refusing to load '{evil}': it holds ")
    assert name in line.split("it holds ", 1)[1].split(",")[0]  # the object, before the explanation
    assert "\n" not in line and "unreadable" not in line
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=f"refusing to load .*{name}"):  # the release reader too
        read_release_files(evil, evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("message", "name"),
    [
        # torch >= 2.6 on a module it blocks outright
        ("Weights only load failed. ...\n\nTrying to load unsupported GLOBAL posix.system whose module "
         "posix is blocked.\n\nCheck the documentation of torch.load", "posix.system"),
        # any other global outside its allow-list
        ("Weights only load failed. ...\n\tWeightsUnpickler error: Unsupported global: GLOBAL "
         "argparse.Namespace was not an allowed global by default. Please use ...", "argparse.Namespace"),
        ("WeightsUnpickler error: Unsupported global: GLOBAL eval was not an allowed global by default.", "eval"),
        # a protocol-2 pickle's Python 2 module name is given as Python 3 imports it
        ("Unsupported global: GLOBAL commands.Popen was not an allowed global by default.", "subprocess.Popen"),
    ],
)  # fmt: skip
def test_both_wordings_of_torchs_refusal_are_read(message: str, name: str) -> None:
    assert refused_object(pickle.UnpicklingError(message)) == name


def test_a_pickle_that_is_no_refusal_names_no_object(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert refused_object(pickle.UnpicklingError("Unsupported operand 37"), junk) is None
    assert refused_object(pickle.UnpicklingError("invalid load key, 'x'.")) is None
    with pytest.raises(CheckpointError, match="is not a checkpoint .*an unreadable pickle"):
        read_checkpoint(junk)


def _photo(root: Path) -> Path:
    path = root / "photos" / "p.png"
    path.parent.mkdir()
    Image.fromarray(np.full((40, 48, 3), 100, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_every_command_that_reads_a_pickle_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: str
) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pkl"
    name = write_evil(evil, payload, marker)
    dfrm = tmp_path / "dfrm_x16.pkl"
    torch.save({"state_dict": release_dfrm_state(16)}, dfrm)
    out = tmp_path / "out"
    commands = [
        ["import-release", "--dfrm", evil, "--tadm", evil, "--output", out / "a.safetensors"],
        ["import-release", "--dfrm", dfrm, "--tadm", evil, "--output", out / "b.safetensors"],
        ["upscale", "--ckpt", evil, _photo(tmp_path), "-o", out / "hr"],
        ["export", evil, "-o", out / "c.safetensors"],
        ["export", evil, "--format", "onnx", "-o", out / "d.onnx"],
    ]
    for command in commands:
        code = main([str(c) for c in command])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, command
        assert len(err) == 1 and f"refusing to load '{evil}': it holds {name}" in err[0], (command, err)
        assert not marker.exists(), command
    assert not out.exists() or not any(out.rglob("*"))  # nothing written
