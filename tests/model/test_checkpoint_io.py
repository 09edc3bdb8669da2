"""tadm export: a real stage-2 checkpoint (tiny backbone, one step through the CLI) exported to a small
safetensors file and read back; bf16 everywhere except the bit-exact fp32 rescaler; error cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tadm.commands.export import export_command
from tadm.errors import CheckpointError, TadmError
from tadm.model.checkpoints import export_checkpoint, read_checkpoint
from tests.helpers.cli import build_cli, stage_args


def _args(root: Path, stage: str = "enhancer", extra: list[str] | None = None) -> list[str]:
    """The stage's real config shrunk to the tiny backbone, run under ``root``."""
    return stage_args(stage=stage, extra=extra, root=root)


_cli = build_cli


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def test_export_keeps_trained_tensors_rescaler_fp32_others_bf16(stage2_ckpt: Path, tmp_path: Path) -> None:
    ckpt = torch.load(stage2_ckpt, weights_only=False)
    state, meta = read_checkpoint(stage2_ckpt)
    assert state.keys() == ckpt["state_dict"].keys() and meta == ckpt["tadm"]
    assert meta["stage"] == "enhancer" and meta["scale"] == 16 and "tiny-sd21" in meta["backbone_id"]
    assert ckpt["optimizer_states"]  # what the export leaves behind

    out = export_checkpoint(stage2_ckpt, tmp_path / "tadm.safetensors")
    assert out == tmp_path / "tadm.safetensors"
    got, got_meta = read_checkpoint(out)
    assert got_meta == meta  # backbone id, rescaler, stage, scale and the full run config
    assert isinstance(got_meta["config"], str) and "tiny-sd21" in got_meta["config"]
    assert got.keys() == state.keys()
    rescaler = [k for k in state if k.startswith("rescaler.")]
    others = [k for k in state if not k.startswith("rescaler.") and state[k].is_floating_point()]
    assert rescaler and any(".lora_" in k for k in others) and any(k.startswith("aligner.") for k in others)
    for k in rescaler:  # bit-exact: the LR image must not change
        assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]), k
    for k in others:
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], _bf16(state[k])), k
    assert any(not torch.equal(got[k].float(), state[k]) for k in others)  # really rounded
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["export_dtype"] == "bf16" and json.loads(metadata["tadm"]) == meta
    assert out.stat().st_size < 0.5 * stage2_ckpt.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["tadm.safetensors"]  # no temp file left


def test_exported_file_initialises_a_model(stage2_ckpt: Path, tmp_path: Path) -> None:
    """``init_from`` reads the export; tensors are cast back to the model's fp32."""
    out = export_checkpoint(stage2_ckpt, tmp_path / "tadm.safetensors")
    state, _ = read_checkpoint(stage2_ckpt)
    model = _cli(_args(tmp_path, stage="joint", extra=[f"--model.init_from={out}"])).model
    loaded = model.model.state_dict()
    for k, v in state.items():
        want = v if k.startswith("rescaler.") else _bf16(v).to(v.dtype)
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], want), k


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_other_dtypes(stage2_ckpt: Path, tmp_path: Path, dtype: str) -> None:
    state, _ = read_checkpoint(stage2_ckpt)
    got, _ = read_checkpoint(export_checkpoint(stage2_ckpt, tmp_path / "x.safetensors", dtype=dtype))
    for k, v in state.items():
        if dtype == "fp32" or k.startswith("rescaler.") or not v.is_floating_point():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k].dtype == torch.float16 and torch.equal(got[k], v.half()), k


def _fake_ckpt(path: Path, state: dict[str, Tensor], meta: dict | None = None) -> Path:
    ckpt: dict = {"state_dict": state, "optimizer_states": []}
    if meta is not None:
        ckpt["tadm"] = meta
    torch.save(ckpt, path)
    return path


META = {
    "backbone_id": "stable_diffusion:tiny-sd21:x",
    "rescaler": "r",
    "stage": "enhancer",
    "scale": 16,
    "config": None,
}


def test_overwrite_is_refused_and_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _fake_ckpt(tmp_path / "a.ckpt", {"rescaler.w": torch.randn(3), "aligner.w": torch.randn(3)}, META)
    dst = tmp_path / "out" / "a.safetensors"  # the folder is created
    export_checkpoint(src, dst)
    before = dst.read_bytes()
    _fake_ckpt(src, {"rescaler.w": torch.randn(3), "aligner.w": torch.randn(3)}, META)
    with pytest.raises(FileExistsError, match=r"a.safetensors' exists.*overwrite"):
        export_checkpoint(src, dst)
    assert dst.read_bytes() == before

    import safetensors.torch

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(src, dst, overwrite=True)
    assert dst.read_bytes() == before  # the old export is intact, no temp file is left
    assert [p.name for p in dst.parent.iterdir()] == ["a.safetensors"]
    monkeypatch.undo()
    export_checkpoint(src, dst, overwrite=True)
    assert torch.equal(read_checkpoint(dst)[0]["rescaler.w"], torch.load(src)["state_dict"]["rescaler.w"])


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_checkpoint(missing)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.ckpt' is not a checkpoint"):
        read_checkpoint(junk)
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match=r"bare.pt' .* not a Lightning checkpoint"):
        read_checkpoint(bare)
    foreign = _fake_ckpt(tmp_path / "foreign.ckpt", {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"foreign.ckpt' is a Lightning checkpoint but not a tadm one"):
        read_checkpoint(foreign)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match=r"plain.safetensors' .* not a tadm checkpoint"):
        read_checkpoint(plain)

    src = _fake_ckpt(tmp_path / "big.ckpt", {"aligner.w": torch.tensor([1.0, 1e6])}, META)
    with pytest.raises(CheckpointError, match=r"'aligner.w' overflows fp16"):
        export_checkpoint(src, tmp_path / "big.safetensors", dtype="fp16")
    assert not (tmp_path / "big.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"must end in .safetensors"):
        export_checkpoint(src, tmp_path / "big.ckpt2")
    with pytest.raises(ValueError, match="unknown export dtype"):
        export_checkpoint(src, tmp_path / "big.safetensors", dtype="int8")


def test_export_command(stage2_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.safetensors"
    assert export_command([str(stage2_ckpt), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    mb_in, mb_out = stage2_ckpt.stat().st_size / 1e6, out.stat().st_size / 1e6
    assert f"{mb_in:.2f} MB" in printed and f"{mb_out:.2f} MB" in printed and "bf16" in printed
    assert export_command([str(stage2_ckpt), "-o", str(out)]) == 2  # exists: an unusable invocation
    assert "exists" in capsys.readouterr().err
    assert export_command([str(stage2_ckpt), "-o", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    exported = read_checkpoint(out)[0]
    assert all(v.dtype == torch.float32 for k, v in exported.items() if k.startswith("aligner."))
    assert export_command([str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(
    stage2_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export and import-release share the check: a folder, or a path under a file, is one line, exit 2."""
    from tadm.commands.import_release import import_release_command

    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    for target, why in ((tmp_path, "is a folder"), (blocker / "x.safetensors", "is not a folder")):
        assert export_command([str(stage2_ckpt), "-o", str(target)]) == 2
        assert why in capsys.readouterr().err
        missing = str(tmp_path / "missing")  # never read: the output is checked first
        assert import_release_command(["--dfrm", missing, "--tadm", missing, "--output", str(target)]) == 2
        assert why in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------------------------------
# Loading never runs code; malformed files are one-line errors


def _an_image(root: Path) -> Path:
    path = root / "photos" / "p.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), 100, np.uint8)).save(path)
    return path


class _Plant:
    """Unpickling this object creates a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(
    stage2_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tadm.commands.main import main

    marker = tmp_path / "pwned"
    ckpt = torch.load(stage2_ckpt, weights_only=True)
    ckpt["tadm"]["extra"] = _Plant(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.ckpt': it holds .*getattr"):
        read_checkpoint(evil)
    photos = _an_image(tmp_path).parent
    commands = [
        ["downscale", "--ckpt", evil, photos, "-o", tmp_path / "lr"],
        ["upscale", "--ckpt", evil, photos, "-o", tmp_path / "hr"],
        ["evaluate", "--ckpt", evil, photos, "-o", tmp_path / "report"],
        ["export", evil, "-o", tmp_path / "e.safetensors"],
    ]
    for command in commands:
        assert main([str(c) for c in command]) == 2
        err = capsys.readouterr().err.strip()
        assert "refusing to load" in err and len(err.splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TadmError, match="refusing to load"):  # model.init_from takes the same path
        _cli(_args(tmp_path, extra=[f"--model.init_from={evil}"]))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tadm": "[1, 2]"}, "is a list, not a dict"),
        ({"tadm": '{"backbone_id": "x", "stage": "enhancer", "config": null}'}, "no valid 'scale'"),
        ({"tadm": "{not json"}, "not valid JSON"),
    ],
)
def test_malformed_export_metadata_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metadata: dict[str, str], message: str
) -> None:
    from tadm.commands.main import main

    bad = tmp_path / "bad.safetensors"
    save_file({"rescaler.w": torch.zeros(2)}, str(bad), metadata=metadata)
    code = main(["upscale", "--ckpt", str(bad), str(_an_image(tmp_path)), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and str(bad) in err and len(err.splitlines()) == 1


def test_tensors_that_do_not_fit_the_model_are_a_one_line_error(
    stage2_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tadm.commands.main import main

    state, meta = read_checkpoint(stage2_ckpt)
    key = next(k for k in state if k.startswith("rescaler."))
    state[key] = torch.zeros(3, 1, 1, 1)
    bad = tmp_path / "shapes.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad), metadata={"tadm": json.dumps(meta)})
    code = main(["upscale", "--ckpt", str(bad), str(_an_image(tmp_path)), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not fit this model" in err and key in err and len(err.splitlines()) == 1
