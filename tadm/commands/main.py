"""The ``tadm`` entry point: our own commands, and LightningCLI's ``fit/validate/test/predict``.

Start-up stays short (``benchmarks/startup.py``): a command's module is imported only when that command
runs, and ``tadm --help`` is printed from the two tables below, so it imports neither Lightning nor torch.
The Lightning commands, ``tadm fit --help`` included, import Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from tadm.commands.common import EXIT_OK, EXIT_USAGE


class Command(NamedTuple):
    """One of our commands: where it lives, and its line in ``tadm --help`` (read without importing it)."""

    #: "module:function"; the function takes argv and returns the exit code
    target: str
    summary: str


COMMANDS: dict[str, Command] = {
    "list": Command(
        "tadm.commands.list_plugins:list_command", "every plug-in: kind, short name, class, description"
    ),
    "shard": Command(
        "tadm.commands.shard:shard_command", "pack images into WebDataset shards (optionally latents)"
    ),
    "downscale": Command(
        "tadm.commands.downscale_upscale:downscale_command", "HR images -> 8-bit LR PNGs (a checkpoint)"
    ),
    "upscale": Command(
        "tadm.commands.downscale_upscale:upscale_command", "LR PNGs -> HR images at their original size"
    ),
    "evaluate": Command(
        "tadm.commands.evaluate:evaluate_command", "metrics of a checkpoint on images, in a report"
    ),
    "export": Command("tadm.commands.export:export_command", "a small inference checkpoint (.safetensors)"),
    "import-release": Command(
        "tadm.commands.import_release:import_release_command",
        "the TADM authors' weights -> a tadm checkpoint",
    ),
    "embed-prompt": Command(
        "tadm.commands.embed_prompt:embed_prompt_command",
        "a DiT backbone's empty-prompt embedding, once (no T5)",
    ),
    "study": Command("tadm.commands.study:study_command", "plan or run a study: one fit + evaluate per cell"),
    "compare": Command(
        "tadm.commands.compare:compare_command", "evaluated runs side by side: a table and plots"
    ),
    "demo": Command("tadm.commands.demo:demo_command", "the codec as a local web page (gradio: tadm[demo])"),
}

#: LightningCLI's subcommands (``tadm.commands.lightning``); ``tests/model/test_startup.py`` checks the names
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a stage: tadm fit --config configs/quickstart.yaml [--config more.yaml]",
    "validate": "Lightning's validation loop on the config's data (--ckpt_path C)",
    "test": "Lightning's test loop on the config's data (--ckpt_path C)",
    "predict": "Lightning's predict loop on the config's data (--ckpt_path C)",
}


def usage() -> str:
    """The text of ``tadm --help``: every command and its line."""
    width = max(map(len, [*COMMANDS, *LIGHTNING_COMMANDS])) + 2
    return "\n".join(
        [
            "usage: tadm COMMAND [options]    (tadm COMMAND --help: its options)",
            "",
            "tadm: extreme image rescaling (x16, x32) with diffusion priors.",
            "",
            "training (LightningCLI; tadm fit --help lists every model, data and trainer option):",
            *(f"  {name:<{width}}{text}" for name, text in LIGHTNING_COMMANDS.items()),
            "",
            "commands:",
            *(f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items()),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"{usage()}\n\ntadm: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK
    if args[0] in COMMANDS:
        module, _, function = COMMANDS[args[0]].target.partition(":")
        return int(getattr(importlib.import_module(module), function)(args[1:]))
    from tadm.commands.lightning import lightning_main

    return lightning_main(None if argv is None else args)


if __name__ == "__main__":
    sys.exit(main())
