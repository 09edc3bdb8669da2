"""Registry behaviour: short names, duplicates, third-party plug-ins, jsonargparse resolution."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import EntryPoint, version
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from torch import Tensor

from tadm.commands.main import main
from tadm.config import plugins as reg
from tadm.config.plugins import find_short_name, load_plugins
from tadm.contracts import ALIGNERS, BACKBONES, RESCALERS, Registry, RegistryError, Rescaler
from tadm.datamodules.image_folder import ImageFolderDataModule
from tests.helpers import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


class _Base:
    pass


def test_register_get_and_describe() -> None:
    r = Registry("widget", base=_Base)

    @r.register("a")
    class A(_Base):
        """First line is the description.

        More text."""

    assert r.get("a") is A
    assert "a" in r and list(r) == ["a"]
    assert A.registry_name == "a"
    assert A.registry_description == "First line is the description."
    assert r.class_path("a").endswith("test_registry.test_register_get_and_describe.<locals>.A")


def test_duplicate_name_rejected_with_both_classes_named() -> None:
    r = Registry("widget")

    @r.register("x")
    class One:
        pass

    with pytest.raises(RegistryError, match=r"'x' is already registered by .*One.*Two"):

        @r.register("x")
        class Two:
            pass

    assert r.get("x") is One


def test_unknown_name_lists_known() -> None:
    r = Registry("widget")
    r.register("known")(type("K", (), {}))
    with pytest.raises(RegistryError, match=r"unknown widget 'nope'; registered widgets: known"):
        r.get("nope")


def test_wrong_base_rejected() -> None:
    r = Registry("widget", base=_Base)
    with pytest.raises(RegistryError, match="must subclass _Base"):
        r.register("bad")(type("Bad", (), {}))


def test_builtins_registered() -> None:
    assert {"dfrm", "bicubic"} <= set(RESCALERS)
    assert "space_to_depth" in BACKBONES


def test_short_name_resolves_only_for_matching_kind() -> None:
    assert find_short_name(Rescaler, "dfrm") == "tadm.components.rescalers.dfrm.DFRM"
    assert find_short_name(torch.nn.Linear, "dfrm") is None


def test_entry_point_plugin_is_imported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A third-party package's module named by the ``tadm.plugins`` entry point gets imported."""
    pkg = tmp_path / "thirdparty_tadm_plugin.py"
    pkg.write_text(
        "from tadm.components.rescalers.bicubic import Bicubic\n"
        "from tadm.contracts import RESCALERS\n"
        "@RESCALERS.register('thirdparty_bicubic')\n"
        "class ThirdParty(Bicubic):\n    '''A third-party rescaler.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="thirdparty", value="thirdparty_tadm_plugin", group=reg.ENTRY_POINT_GROUP)
    monkeypatch.setattr(reg, "entry_points", lambda group: [ep] if group == reg.ENTRY_POINT_GROUP else [])
    try:
        load_plugins(force=True)
        assert "thirdparty_bicubic" in RESCALERS
    finally:
        RESCALERS.unregister("thirdparty_bicubic")


def test_broken_plugin_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="broken", value="no_such_module_for_tadm", group=reg.ENTRY_POINT_GROUP)
    monkeypatch.setattr(reg, "entry_points", lambda group: [ep])
    with pytest.raises(ImportError, match="tadm plug-in 'broken'.*no_such_module_for_tadm"):
        load_plugins(force=True)


@RESCALERS.register("test_identity_rescaler")
class IdentityRescaler(Rescaler):
    """A pixel rescaler defined outside the packages (tests that third-party names resolve)."""

    space = "pixel"

    def downscale(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return x[..., :: self.scale, :: self.scale]

    def upscale(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.scale, -1).repeat_interleave(self.scale, -2)


def test_short_name_chosen_in_config(capsys: pytest.CaptureFixture[str]) -> None:
    """`class_path: <short name>` resolves through jsonargparse for a plug-in registered here."""
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints and exits 0
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--model.rescaler",
                "test_identity_rescaler",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: tests.config.test_registry.IdentityRescaler" in out
    assert "class_path: tadm.components.backbones.space_to_depth.SpaceToDepthBackbone" in out


def test_list_command_prints_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("rescaler", "backbone", "dfrm", "bicubic", "space_to_depth"):
        assert word in out


# --- short names through jsonargparse, every way a value reaches it -----------------------------------


def _parsed(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """The config `tadm fit --config quickstart.yaml ARGS` parses to (``--print_config``: nothing is built)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args, "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return yaml.safe_load(out)


def _imported(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


#: (config section, value, the registry that names it): a short name of each plug-in kind, and a data
#: module (None), which registers no short name: jsonargparse resolves its class name among the imported ones
KINDS = [
    ("model.rescaler", "bicubic", RESCALERS),
    ("model.aligner", "fixed", ALIGNERS),
    ("model.backbone", "space_to_depth", BACKBONES),
    ("data", "ImageFolderDataModule", None),
]


def _expected(name: str, registry: Registry | None) -> type:
    return ImageFolderDataModule if registry is None else registry.get(name)


def _section(cfg: dict[str, Any], dotted: str) -> dict[str, Any]:
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


@pytest.mark.parametrize(("key", "name", "registry"), KINDS, ids=[k for k, _, _ in KINDS])
def test_short_name_in_a_yaml_file(
    key: str, name: str, registry: Registry | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`class_path: <short name>` in a config file composed onto a recipe resolves to the registered class."""
    spec: dict[str, Any] = {"class_path": name}
    for part in reversed(key.split(".")):
        spec = {part: spec}
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(spec))
    resolved = _section(_parsed(capsys, "--config", str(overlay)), key)["class_path"]
    cls = _expected(name, registry)
    assert resolved == f"{cls.__module__}.{cls.__qualname__}"  # what run configs and checkpoints store
    assert _imported(resolved) is cls


#: the command-line spellings: `--key=name`, `--key name`, `--key.class_path=name`, `--key=file.yaml`
SPELLINGS = ["equals", "two_tokens", "class_path", "nested_file"]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(("key", "name", "registry"), KINDS, ids=[k for k, _, _ in KINDS])
def test_short_name_on_the_command_line(
    key: str,
    name: str,
    registry: Registry | None,
    spelling: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nested = tmp_path / "choice.yaml"
    nested.write_text(f"class_path: {name}\n")
    args = {
        "equals": [f"--{key}={name}"],
        "two_tokens": [f"--{key}", name],
        "class_path": [f"--{key}.class_path={name}"],
        "nested_file": [f"--{key}={nested}"],
    }[spelling]
    resolved = _section(_parsed(capsys, *args), key)["class_path"]
    cls = _expected(name, registry)
    assert resolved == f"{cls.__module__}.{cls.__qualname__}"
    assert _imported(resolved) is cls


def test_short_name_init_args_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A short name chosen on the command line takes its own arguments there too."""
    cfg = _parsed(capsys, "--model.aligner=fixed", "--model.aligner.init_args.t=123")
    assert cfg["model"]["aligner"] == {"class_path": ALIGNERS.class_path("fixed"), "init_args": {"t": 123.0}}


def test_class_name_still_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    """jsonargparse's own resolution (a class name among the imported subclasses) is left working."""
    cfg = _parsed(capsys, "--model.rescaler=Bicubic")
    assert cfg["model"]["rescaler"]["class_path"] == RESCALERS.class_path("bicubic")


def test_help_of_a_short_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`--model.rescaler.help <short name>` prints that plug-in's arguments and docstrings."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.rescaler.help", "bicubic"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "Help for --model.rescaler.help=tadm.components.rescalers.bicubic.Bicubic" in out
    assert "--model.rescaler.scale SCALE" in out and "HR -> LR downscaling factor" in out


def test_unknown_short_name_lists_the_registered_ones(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["fit", "--config", QUICKSTART, "--model.aligner=nosuch", "--print_config"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert f"unknown aligner 'nosuch'; registered aligners: {', '.join(ALIGNERS)}" in err


def test_every_jsonargparse_binding_of_the_resolver_is_wrapped() -> None:
    """The wrapper replaces the private resolver wherever jsonargparse bound it; a release that adds a
    binding the wrapper misses, or renames the function, fails here (and the pinned range is wrong)."""
    holders = {
        name: vars(module)[reg.RESOLVER_NAME]
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "jsonargparse" and reg.RESOLVER_NAME in vars(module)
    }
    assert "jsonargparse._typehints" in holders
    assert all(getattr(fn, "_tadm_wrapped", False) for fn in holders.values()), holders


def test_missing_resolver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from jsonargparse import _typehints

    monkeypatch.delattr(_typehints, reg.RESOLVER_NAME)
    with pytest.raises(ImportError, match=r"jsonargparse .* has no _typehints.resolve_class_path_by_name"):
        reg._install_short_name_resolver()


def test_installed_jsonargparse_is_in_the_pinned_range() -> None:
    """The wrapper relies on a private jsonargparse function, so pyproject.toml pins the releases it was
    tested with, an upper bound included; the installed one must be among them."""
    lines = (REPO / "pyproject.toml").read_text().splitlines()
    (pin,) = [
        Requirement(x.strip().rstrip(",").strip('"')) for x in lines if x.strip().startswith('"jsonargparse')
    ]
    assert any(spec.operator in {"<", "<=", "==", "~="} for spec in pin.specifier), pin
    assert pin.specifier.contains(version("jsonargparse")), (version("jsonargparse"), str(pin))
