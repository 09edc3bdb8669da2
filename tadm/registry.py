"""Plug-in registries: short names for rescalers, backbones and aligners.

jsonargparse/LightningCLI does all construction from ``class_path``/``init_args``. The registry
only (1) records a short name and a one-line description per class, (2) imports every built-in
and every third-party plug-in (entry-point group ``tadm.plugins``) before configs are parsed, and
(3) teaches jsonargparse to resolve a registered short name (``class_path: dfrm``) to its class.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tadm.plugins"
BUILTIN_PACKAGES = ("components.rescalers", "components.backbones", "components.aligners", "datamodules")


class RegistryError(KeyError):
    """A short name is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry:
    """Maps short names to classes of one plug-in kind (one instance per kind)."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, type] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[type], type]:
        """Class decorator: ``@RESCALERS.register("dfrm")``. Duplicate names are rejected."""

        def deco(cls: type) -> type:
            if name in self._classes and self._classes[name] is not cls:
                other = self._classes[name]
                raise RegistryError(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{other.__module__}.{other.__qualname__}; cannot register "
                    f"{cls.__module__}.{cls.__qualname__} under the same name"
                )
            if self.base is not None and not issubclass(cls, self.base):
                raise RegistryError(
                    f"{cls.__qualname__} must subclass {self.base.__qualname__} to be a {self.kind}"
                )
            cls.registry_name = name
            doc = description or (cls.__doc__ or "").strip().splitlines()[0:1]
            cls.registry_description = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._classes[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        if name not in self._classes:
            known = ", ".join(sorted(self._classes)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}")
        return self._classes[name]

    def unregister(self, name: str) -> None:
        """Remove a name (tests and interactive sessions use this)."""
        self._classes.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._classes))

    def items(self) -> list[tuple[str, type]]:
        return sorted(self._classes.items())

    def class_path(self, name: str) -> str:
        cls = self.get(name)
        return f"{cls.__module__}.{cls.__qualname__}"


RESCALERS = Registry("rescaler")
BACKBONES = Registry("backbone")
ALIGNERS = Registry("aligner")
ALL_REGISTRIES = (RESCALERS, BACKBONES, ALIGNERS)

_loaded = False


def _import_submodules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


def load_plugins(force: bool = False) -> None:
    """Import built-in components and third-party plug-ins so their names are registered.

    A third-party package declares ``[project.entry-points."tadm.plugins"] name = "pkg.module"``;
    importing that module is expected to run its ``@REGISTRY.register(...)`` decorators.
    A plug-in that fails to import is reported with its name and the error, not skipped silently.
    """
    global _loaded
    if _loaded and not force:
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
    _loaded = True


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


def _install_short_name_resolver() -> None:
    """Let jsonargparse accept registered short names as ``class_path``.

    jsonargparse resolves a dot-less ``class_path`` by class name only; we wrap its resolver so a
    registered short name is tried first. tests/test_registry.py fails if a jsonargparse release
    moves this function.
    """
    from jsonargparse import _from_config, _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_tadm_wrapped", False):
        return

    def resolve(cls: Any, name: str) -> str:
        if isinstance(name, str) and "." not in name:
            hit = find_short_name(cls, name)
            if hit is not None:
                return hit
        return original(cls, name)

    resolve._tadm_wrapped = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve
    if hasattr(_from_config, "resolve_class_path_by_name"):
        _from_config.resolve_class_path_by_name = resolve
