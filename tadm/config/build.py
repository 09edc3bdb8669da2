"""YAML -> objects, in one place: the argument links every parser shares, the model of a run config,
and the backbone alone (``tadm shard --latents``).

Values written once and linked (LightningCLI's ``link_arguments``): ``model.scale`` into the rescaler
and the data module, the backbone's latent layout into the rescaler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tadm.config.plugins import load_plugins
from tadm.errors import CheckpointError, TadmError


def link_model_arguments(parser: Any, with_data: bool = True) -> None:
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
    parser.link_arguments(
        "model.backbone",
        "model.rescaler.init_args.latent_scaling",
        compute_fn=lambda backbone: backbone.scaling_factor,
        apply_on="instantiate",
    )


def _model_parser() -> Any:
    """A parser for the ``model:`` section of a run config, with the CLI's links."""
    from lightning.pytorch.cli import LightningArgumentParser

    from tadm.model.module import TADMModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(TADMModule, "model")
    link_model_arguments(parser, with_data=False)
    return parser


def build_module(config_yaml: str, source: str, backbone_pretrained: str | None = None) -> Any:
    """Rebuild the TADMModule a run config describes, for inference (no losses, no init_from).

    Every way the stored config can fail to rebuild (unreadable YAML, a class that no longer exists, a
    backbone that cannot be loaded here) is a :class:`CheckpointError` naming the checkpoint.
    """
    load_plugins()
    try:
        cfg = yaml.safe_load(config_yaml) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(
            f"checkpoint {source}: its stored run config is not valid YAML ({_first_line(err)})"
        ) from err
    model_cfg = dict(cfg.get("model") or {}) if isinstance(cfg, dict) else {}
    if not model_cfg:
        raise CheckpointError(f"checkpoint {source} holds no model config; was it written by tadm?")
    model_cfg["init_from"] = None  # its weights are about to be loaded from this very checkpoint
    model_cfg["loss_weights"] = {}  # inference needs no loss networks (and no VGG weights)
    for key in ("optimizer", "lr_scheduler"):
        model_cfg.pop(key, None)
    if backbone_pretrained is not None:
        model_cfg["backbone"] = _with_pretrained(model_cfg.get("backbone"), backbone_pretrained, source)
    parser = _model_parser()
    try:
        ns = parser.parse_object({"model": model_cfg})
        return parser.instantiate_classes(ns).model
    except OSError as err:
        backbone = (model_cfg.get("backbone") or {}).get("init_args", {})
        raise CheckpointError(
            f"checkpoint {source} needs backbone {backbone.get('preset')!r} from "
            f"{backbone.get('pretrained') or 'its preset hub id'!r}, which cannot be loaded here: {err}. "
            "Copy the backbone folder to this machine and pass --backbone /path/to/folder."
        ) from err
    except TadmError:
        raise
    except Exception as err:  # jsonargparse / a component refusing the stored values
        raise CheckpointError(
            f"checkpoint {source}: its stored run config cannot be rebuilt here "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _with_pretrained(backbone_cfg: Any, pretrained: str, source: str) -> dict[str, Any]:
    """The stored backbone config with ``pretrained`` replaced; an error when that backbone takes none."""
    import importlib
    import inspect

    from tadm.contracts import BACKBONES

    cfg = dict(backbone_cfg or {})
    class_path = str(cfg.get("class_path", ""))
    try:
        if class_path in BACKBONES:
            cls = BACKBONES.get(class_path)
        else:
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source}: unknown backbone class {class_path!r} ({err})") from err
    if "pretrained" not in inspect.signature(cls.__init__).parameters:
        raise CheckpointError(
            f"checkpoint {source}: its backbone {class_path!r} loads no weights from a folder or hub id, "
            f"so --backbone {pretrained} does not apply; drop --backbone"
        )
    init_args = dict(cfg.get("init_args") or {})
    init_args["pretrained"] = pretrained
    cfg["init_args"] = init_args
    return cfg


def build_backbone(configs: Sequence[str], overrides: Sequence[str] = ()) -> Any:
    """Build only ``model.backbone`` of tadm YAML configs, composed left to right like ``tadm fit --config``.

    ``overrides`` are ``KEY=VALUE`` strings for the backbone's ``init_args`` (values parsed as YAML), e.g.
    ``pretrained=/models/stable-diffusion-2-1-base``.
    """
    from jsonargparse import ArgumentParser

    from tadm.contracts import DiffusionBackbone

    load_plugins()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=DiffusionBackbone)
    sections: list[tuple[str, Any]] = []
    for config in configs:
        path = Path(config)
        if not path.is_file():
            raise TadmError(f"config '{config}' does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        section = (data.get("model") or {}).get("backbone") if isinstance(data, dict) else None
        if section is not None:
            sections.append((config, section))
    if not sections:
        raise TadmError(f"no model.backbone in the config(s) {list(configs)}")
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise TadmError(f"a backbone override must be KEY=VALUE, got {item!r}")
        sections.append((f"override {item}", {"init_args": {name: yaml.safe_load(value)}}))
    cfg = None
    for source, section in sections:
        try:
            cfg = _parse_onto(parser, {"backbone": section}, cfg)
        except Exception as exc:
            raise TadmError(f"invalid model.backbone in {source}: {exc}") from exc
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(cfg).backbone


def _parse_onto(parser: Any, obj: dict[str, Any], base: Any) -> Any:
    """``parse_object`` onto an earlier result (jsonargparse renamed ``cfg_base`` to ``namespace`` in 4.50)."""
    if base is None:
        return parser.parse_object(obj)
    try:
        return parser.parse_object(obj, namespace=base)
    except ValueError as exc:
        if "Unexpected keyword" not in str(exc):
            raise
        return parser.parse_object(obj, cfg_base=base)
