"""Registry behaviour: short names, duplicates, third-party plug-ins, jsonargparse resolution."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch
from torch import Tensor

from tadm.commands.main import main
from tadm.config import plugins as reg
from tadm.config.plugins import find_short_name, load_plugins
from tadm.contracts import BACKBONES, RESCALERS, Registry, RegistryError, Rescaler
from tests.helpers import REPO


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
    assert "class_path: tests.test_registry.IdentityRescaler" in out
    assert "class_path: tadm.components.backbones.space_to_depth.SpaceToDepthBackbone" in out


def test_list_command_prints_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("rescaler", "backbone", "dfrm", "bicubic", "space_to_depth"):
        assert word in out
