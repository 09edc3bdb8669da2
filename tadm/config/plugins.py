"""Plug-in discovery and short names in YAML (``class_path: dfrm``).

:func:`load_plugins` imports every built-in plug-in module and every third-party plug-in (Python
entry-point group ``tadm.plugins``) so their ``@REGISTRY.register`` decorators run before a config
is parsed, and teaches jsonargparse to resolve a registered short name to its class. One mechanism for
every plug-in, so ``tadm list`` and the short names cannot disagree; it stays cheap because a plug-in
module imports only torch and the bottom layer at import time (diffusers, transformers and peft inside
the functions that build a diffusion backbone), which ``tests/model/test_startup.py`` checks.
The built-in data modules import Lightning: only LightningCLI, which resolves ``data: class_path``
among the imported data modules, asks for them (``load_plugins(data=True)``, the default).

Why a wrapper around a private function: jsonargparse resolves a dot-less ``class_path`` by the class's
own ``__name__`` among the imported subclasses of the type hint (documented under "Class type and
sub-classes"); its public API, checked through 4.53, has no hook that gives a class another name:

- ``jsonargparse.typing.class_from_function(cls, name="dfrm")`` makes a *new*, selectable class named
  ``dfrm``; the parsed ``class_path``, which run configs and checkpoints store, would then name that
  stand-in (``<module>.dfrm``) instead of the plug-in's class (``tadm.components.rescalers.dfrm.DFRM``),
  and an unknown name would no longer list the registered ones;
- ``jsonargparse.typing.register_type`` replaces subclass parsing for the whole kind (no ``init_args``,
  no ``--*.help``); ``set_parsing_settings`` and ``add_instantiator`` do not touch resolution.

So :func:`_install_short_name_resolver` wraps ``jsonargparse._typehints.resolve_class_path_by_name``
(in every jsonargparse module that bound it by name) to try the registered short names first and
defer to jsonargparse otherwise. A private function can change in any release, so ``pyproject.toml``
pins jsonargparse to the releases tested (floor and ceiling), ``tests/config/test_registry.py`` fails when
the installed release is outside that range or a short name stops resolving in YAML, on the command
line or in ``--*.help``, and the wrapper raises a clear error if the function is gone.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from importlib.metadata import entry_points
from typing import Any

from tadm.contracts import ALL_REGISTRIES

ENTRY_POINT_GROUP = "tadm.plugins"
#: packages whose every module is imported: the built-in plug-ins
BUILTIN_PACKAGES = (
    "tadm.components.rescalers",
    "tadm.components.backbones",
    "tadm.components.aligners",
)
#: the built-in data modules (they import Lightning), imported only for ``load_plugins(data=True)``
DATA_PACKAGE = "tadm.datamodules"

_loaded: set[str] = set()  # "plugins" and "data" once imported


def _import_submodules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


def load_plugins(force: bool = False, data: bool = True) -> None:
    """Import built-in components and third-party plug-ins so their names are registered.

    A third-party package declares ``[project.entry-points."tadm.plugins"] name = "pkg.module"``;
    importing that module is expected to run its ``@REGISTRY.register(...)`` decorators.
    A plug-in that fails to import is reported with its name and the error, not skipped silently.
    ``data=False`` leaves out the built-in data modules (and with them Lightning): ``tadm list`` and the
    model rebuilt for inference do not need them.
    """
    if data and ("data" not in _loaded or force):
        _import_submodules(DATA_PACKAGE)
        _loaded.add("data")
    if "plugins" in _loaded and not force:
        return
    for package in BUILTIN_PACKAGES:
        _import_submodules(package)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:
            raise ImportError(
                f"tadm plug-in {ep.name!r} (entry point {ep.value!r} in group {ENTRY_POINT_GROUP!r}) "
                f"failed to import: {err}"
            ) from err
    _install_short_name_resolver()
    _loaded.add("plugins")


def find_short_name(base: Any, name: str) -> str | None:
    """Full class path for a registered short name whose class fits the type hint ``base``."""
    bases = base if isinstance(base, tuple) else (base,)
    for registry in ALL_REGISTRIES:
        if name not in registry:
            continue
        cls = registry.get(name)
        if any(isinstance(b, type) and issubclass(cls, b) for b in bases):
            return f"{cls.__module__}.{cls.__qualname__}"
    return None


def _registry_for(base: Any) -> Any:
    """The registry whose contract is ``base`` (a type hint of a config value), or None."""
    bases = base if isinstance(base, tuple) else (base,)
    for registry in ALL_REGISTRIES:
        if any(b is registry.base for b in bases):
            return registry
    return None


#: jsonargparse's resolver of a dot-less ``class_path`` (private; the module docstring says why)
RESOLVER_NAME = "resolve_class_path_by_name"


def _install_short_name_resolver() -> None:
    """Let jsonargparse accept registered short names as ``class_path`` (see the module docstring)."""
    import jsonargparse
    from jsonargparse import _typehints

    original = getattr(_typehints, RESOLVER_NAME, None)
    if original is None:
        raise ImportError(
            f"jsonargparse {jsonargparse.__version__} has no _typehints.{RESOLVER_NAME}, which tadm wraps "
            "to resolve plug-in short names; install the jsonargparse release pyproject.toml pins"
        )
    if getattr(original, "_tadm_wrapped", False):
        return

    def resolve(cls: Any, name: str) -> str:
        if isinstance(name, str) and "." not in name:
            hit = find_short_name(cls, name)
            if hit is not None:
                return hit
        resolved = original(cls, name)
        if isinstance(resolved, str) and "." not in resolved:  # neither a short name nor a class name
            registry = _registry_for(cls)
            if registry is not None:
                raise ValueError(
                    f"unknown {registry.kind} {name!r}; registered {registry.kind}s: {', '.join(registry)} "
                    "(`tadm list` shows them; third-party ones need their package installed)"
                )
        return resolved

    resolve._tadm_wrapped = True  # type: ignore[attr-defined]
    # modules that imported the function by name hold their own reference: replace it in each of them
    # (vars(), not getattr: jsonargparse's deprecated module aliases warn on attribute access)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "jsonargparse" and vars(module).get(RESOLVER_NAME) is original:
            setattr(module, RESOLVER_NAME, resolve)
