"""``tadm list``: every registered plug-in, its kind, short name, class and one-line description."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tadm.commands.common import EXIT_OK


def list_command(argv: Sequence[str]) -> int:
    """Print every registered plug-in: kind, short name, class and one-line description."""
    argparse.ArgumentParser(prog="tadm list", description=list_command.__doc__).parse_args(list(argv))
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tadm.config.plugins import load_plugins
    from tadm.contracts import ALL_REGISTRIES

    load_plugins(data=False)  # the data modules register no short name (and import Lightning)
    table = Table(title="tadm plug-ins")
    for col in ("kind", "name", "class"):  # whole and on one line: what YAML's class_path takes
        table.add_column(col, no_wrap=True)
    table.add_column("description")
    for registry in ALL_REGISTRIES:
        for name, cls in registry.items():
            path = f"{cls.__module__}.{cls.__qualname__}"
            # Text: a docstring's "[dev]" is text, not rich markup
            table.add_row(registry.kind, name, path, Text(cls.registry_description))
    Console(width=160).print(table)
    return EXIT_OK
