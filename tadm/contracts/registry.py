"""Short names for plug-in classes, one :class:`Registry` per kind.

A registry only records ``name -> class`` (checked against the kind's base class) and a one-line
description for ``tadm list``; construction is jsonargparse's job. Discovery (importing built-in and
third-party plug-ins) and short-name resolution in YAML live in :mod:`tadm.config.plugins`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


class RegistryError(KeyError):
    """A short name is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry:
    """Maps short names to classes of one plug-in kind (one instance per kind)."""

    def __init__(self, kind: str, base: type = object) -> None:
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
            if not issubclass(cls, self.base):
                raise RegistryError(
                    f"{cls.__qualname__} must subclass {self.base.__qualname__} to be a {self.kind}"
                )
            cls.registry_name = name  # type: ignore[attr-defined]
            doc = (cls.__doc__ or "").strip().splitlines()
            cls.registry_description = description or (doc[0] if doc else "")  # type: ignore[attr-defined]
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
