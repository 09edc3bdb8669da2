"""The ``tadm`` entry point: our own commands, and LightningCLI's ``fit/validate/test/predict``.

Each command module is imported only when its command runs, so ``tadm list`` and ``tadm --help`` do not
pay for Lightning or diffusers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command name -> "module:function" taking argv and returning the exit code
COMMANDS: dict[str, str] = {
    "list": "tadm.commands.plugins:list_command",
    "shard": "tadm.commands.shard:shard_command",
    "downscale": "tadm.commands.codec:downscale_command",
    "upscale": "tadm.commands.codec:upscale_command",
    "evaluate": "tadm.commands.evaluate:evaluate_command",
    "export": "tadm.commands.export:export_command",
    "import-release": "tadm.commands.import_release:import_release_command",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, _, function = COMMANDS[args[0]].partition(":")
        return int(getattr(importlib.import_module(module), function)(args[1:]))
    from tadm.commands.lightning import lightning_main

    return lightning_main(None if argv is None else args)


if __name__ == "__main__":
    sys.exit(main())
