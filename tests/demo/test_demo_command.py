"""``tadm demo`` without a browser: its help and defaults need no gradio, a missing gradio is one line naming
the extra (exit 2, before the model loads), and a bad checkpoint is one line too."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tadm.commands import demo as demo_command
from tadm.commands.main import main
from tests.helpers import REPO


def test_help_imports_no_gradio_and_names_the_server_options(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom tadm.commands.main import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit as stop:\n    assert stop.code in (0, None)\n"
        "print('GRADIO-IMPORTED' if 'gradio' in sys.modules else 'NO-GRADIO')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("NO-GRADIO"), done.stdout[-500:]
    for option in (
        "--ckpt",
        "--host",
        "--port",
        "--share",
        "--max-megapixels",
        "--latent-tile",
        "--color-fix",
    ):
        assert option in done.stdout, option


def test_defaults_serve_the_shipped_model_on_localhost_only() -> None:
    args = demo_command.parser().parse_args([])
    assert args.ckpt == str(REPO / "assets" / "models" / "photos_x16.safetensors")
    assert Path(args.ckpt).is_file()
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)
    assert [p.name for p in demo_command.SAMPLE_FOLDERS] == ["val", "heldout"]


def test_without_gradio_it_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: find_spec says None, import fails
    assert importlib.util.find_spec("gradio") is None
    assert main(["demo", "--ckpt", "no/such/model.safetensors"]) == 2  # the extra is named before the model
    err = capsys.readouterr().err.strip()
    assert err == (
        "tadm demo: error: the web demo needs gradio, which is not installed: pip install 'tadm[demo]' "
        "(in a checkout: pip install -e '.[demo]')"
    )


def _never(*args: object) -> None:
    raise AssertionError("the model was loaded: the problem was not noticed before it")


def test_a_folder_left_by_an_uninstalled_gradio_is_no_gradio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """gradio writes a file into its package folder at run time; `pip uninstall` leaves that folder behind,
    and it imports as an empty namespace package."""
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "hash_seed.txt").write_text("0")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gradio", raising=False)
    real = importlib.metadata.distribution

    def no_gradio(name: str) -> object:
        if name == "gradio":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_gradio)
    monkeypatch.setattr(demo_command, "load_from_args", _never)  # fail fast, never serve
    assert importlib.util.find_spec("gradio") is not None
    assert main(["demo"]) == 2
    assert "needs gradio, which is not installed" in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_command, "_installed", lambda name: True)  # as if gradio were there
    assert main(["demo", "--ckpt", "no/such/model.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("tadm demo: error: ") and "no/such/model.safetensors" in err[0]
    ), err


@pytest.mark.parametrize("bad", [["--port", "0"], ["--port", "70000"], ["--max-megapixels", "0"]])
def test_bad_server_options_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        demo_command.parser().parse_args(bad)
    assert stop.value.code == 2 and bad[0] in capsys.readouterr().err


def test_a_taken_port_is_one_line_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_command, "_installed", lambda name: True)
    monkeypatch.setattr(demo_command, "load_from_args", _never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tadm demo: error: --host 127.0.0.1 --port {port}: cannot listen there ("), err
    assert "\n" not in err
