"""``tadm list``: every registered plug-in, its kind, short name, class and one-line description."""

from __future__ import annotations

from collections.abc import Sequence

from tadm.commands.common import EXIT_OK


def list_command(argv: Sequence[str]) -> int:
    """Print every registered plug-in: kind, short name, class and one-line description."""
    from rich.console import Console
    from rich.table import Table

    from tadm.config.plugins import load_plugins
    from tadm.contracts import ALL_REGISTRIES

    load_plugins()
    table = Table(title="tadm plug-ins")
    for col in ("kind", "name", "class", "description"):
        table.add_column(col)
    for registry in ALL_REGISTRIES:
        for name, cls in registry.items():
            table.add_row(
                registry.kind, name, f"{cls.__module__}.{cls.__qualname__}", cls.registry_description
            )
    Console(width=160).print(table)
    return EXIT_OK
