"""The ``tadm`` command: LightningCLI subcommands (fit/validate/test/predict) plus our own.

``tadm fit --config configs/quickstart.yaml [--config more.yaml] [--dotted.override value]``
``tadm list``  prints every registered plug-in kind, short name and description.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

from tadm.registry import ALL_REGISTRIES, load_plugins


def link_model_arguments(parser, with_data: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Values written once and linked: the scale (into rescaler and data) and the latent layout."""
    # The scale is written once, as model.scale; rescaler and data module receive it.
    parser.link_arguments("model.scale", "model.rescaler.init_args.scale", apply_on="parse")
    if with_data:
        parser.link_arguments("model.scale", "data.init_args.scale", apply_on="parse")
    # The latent layout comes from the backbone itself (a rescaler without these args is skipped).
    parser.link_arguments(
        "model.backbone",
        "model.rescaler.init_args.latent_channels",
        compute_fn=lambda backbone: backbone.latent_channels,
        apply_on="instantiate",
    )
    parser.link_arguments(
        "model.backbone",
        "model.rescaler.init_args.latent_factor",
        compute_fn=lambda backbone: backbone.downsample_factor,
        apply_on="instantiate",
    )


class TADMCLI(LightningCLI):
    """LightningCLI with plug-ins loaded first and shared values linked once."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        link_model_arguments(parser, with_data=True)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Keep the full config with every checkpoint (module-typed args are not rebuilt from hparams).
        cfg = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        try:
            self.model.run_config = self._parser(self.subcommand).dump(cfg, skip_none=False)
        except Exception as err:  # a config jsonargparse cannot serialise still trains
            print(f"warning: could not serialise the run config into checkpoints: {err}", file=sys.stderr)

    def before_fit(self) -> None:
        """Also write the run's config next to the checkpoints (the log folder has one too)."""
        ckpt = self.trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath and self.model.run_config and self.trainer.is_global_zero:
            from pathlib import Path

            Path(dirpath).mkdir(parents=True, exist_ok=True)
            (Path(dirpath) / "config.yaml").write_text(self.model.run_config)


def list_command(argv: Sequence[str]) -> int:
    """Print every registered plug-in: kind, short name, class and one-line description."""
    from rich.console import Console
    from rich.table import Table

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
    return 0


def shard_command(argv: Sequence[str]) -> int:
    """Pack images into WebDataset shards (imported lazily: `tadm list` stays fast)."""
    from tadm.shard import shard_command as run

    return run(argv)


def downscale_command(argv: Sequence[str]) -> int:
    from tadm.codec_cli import downscale_command as run

    return run(argv)


def upscale_command(argv: Sequence[str]) -> int:
    from tadm.codec_cli import upscale_command as run

    return run(argv)


def test_command(argv: Sequence[str]) -> int:
    """`tadm test --ckpt C DATA... --output DIR` (metrics table); with --config it is Lightning's test loop."""
    from tadm.eval_cli import test_command as run

    return run(argv)


def export_command(argv: Sequence[str]) -> int:
    from tadm.checkpoint_io import export_command as run

    return run(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "list": list_command,
    "shard": shard_command,
    "downscale": downscale_command,
    "upscale": upscale_command,
    "export": export_command,
}


def _is_lightning_test(args: Sequence[str]) -> bool:
    """`tadm test --config ...` keeps LightningCLI's test loop; anything else is our metrics command."""
    return any(
        a in ("--config", "-c")
        or a.startswith(("--config=", "--ckpt_path", "--model", "--data", "--trainer"))
        for a in args
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    if args and args[0] == "test" and not _is_lightning_test(args[1:]):
        return test_command(args[1:])
    load_plugins()
    from tadm.module import TADMModule

    TADMCLI(
        TADMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "tadm: extreme image rescaling with diffusion priors. Also: `tadm list`, "
            "`tadm shard`, `tadm downscale`, `tadm upscale`, `tadm export`, and `tadm test --ckpt C DATA...`."
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
