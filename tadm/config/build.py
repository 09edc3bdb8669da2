"""YAML -> objects, in one place: the argument links every parser shares, the model of a run config,
and the backbone alone (``tadm shard --latents``).

Values written once and linked (LightningCLI's ``link_arguments``): ``model.scale`` into the rescaler
and the data module, the backbone's latent layout into the rescaler.

A stage-1 run config is rebuilt for inference as a :class:`RescalerModel`, not as the LightningModule:
importing Lightning (with torchmetrics, torchvision, scipy and transformers behind it) costs seconds a
codec call on a stage-1 checkpoint, the shipped quickstart model's, has no use for
(``benchmarks/startup.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from tadm.config.plugins import load_plugins
from tadm.contracts import DiffusionBackbone, Rescaler
from tadm.errors import CheckpointError, TadmError
from tadm.model.trained_state import check_compatible, frozen_backbone_keys, load_trained_state


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


class RescalerModel(nn.Module):
    """A stage-1 (``rescaler``) model for inference, without Lightning: the backbone and the rescaler.

    What :class:`~tadm.training.lightning_module.TADMModule` is in stage 1 for the codec (the same state-dict keys,
    trainable set, checks and loading; ``tests/test_startup.py`` compares the two tensor for tensor and
    output for output), without training, logging or the enhancer.
    """

    stage = "rescaler"
    aligner = None
    enhancer = None
    enhance_fn = None  # no one-step enhancer in stage 1

    def __init__(self, backbone: DiffusionBackbone, rescaler: Rescaler, scale: int = 16) -> None:
        """
        Args:
            backbone: the backbone whose latent space the rescaler works in (its VAE only is loaded).
            rescaler: the trained rescaler.
            scale: HR -> LR factor, linked into the rescaler.
        """
        super().__init__()
        if rescaler.scale != scale:
            raise ValueError(f"rescaler scale {rescaler.scale} differs from model scale {scale}")
        self.backbone, self.rescaler, self.scale = backbone, rescaler, scale
        backbone.load_for_stage(self.stage)
        want = rescaler.latent_channels
        if rescaler.space == "latent" and want is not None and want != backbone.latent_channels:
            raise ValueError(
                f"rescaler expects {want} latent channels but backbone {backbone.backbone_id} "
                f"produces {backbone.latent_channels}"
            )
        backbone.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.rescaler.parameters() if p.requires_grad]
        return params + self.backbone.trainable_parameters(self.stage)

    def _frozen_keys(self) -> set[str]:
        """State-dict keys checkpoints do not store: the frozen backbone."""
        return frozen_backbone_keys(self.backbone, self.stage)

    def check_compatible(self, meta: dict[str, Any] | None, source: str) -> None:
        """Refuse a checkpoint trained on another backbone or at another scale, as ``TADMModule`` does."""
        check_compatible(
            meta,
            source,
            backbone_id=self.backbone.backbone_id,
            scale=self.scale,
            pixel_rescaler=self.rescaler.space == "pixel",
        )

    def load_trained_state(self, state: dict[str, Tensor], source: str) -> None:
        """Load the stored tensors over the frozen backbone; a missing trained tensor is an error."""
        load_trained_state(self, state, source, self._frozen_keys(), require_all=True)


def _rescaler_model_parser() -> Any:
    """A parser for the ``model:`` section of a stage-1 run config, with the CLI's links; no Lightning."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RescalerModel, "model")
    link_model_arguments(parser, with_data=False)
    return parser


def _model_parser() -> Any:
    """A parser for the ``model:`` section of a run config, with the CLI's links."""
    from lightning.pytorch.cli import LightningArgumentParser

    from tadm.training.lightning_module import TADMModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(TADMModule, "model")
    link_model_arguments(parser, with_data=False)
    return parser


def build_module(
    config_yaml: str, source: str, backbone_pretrained: str | None = None, lightweight: bool = True
) -> Any:
    """Rebuild the TADMModule a run config describes, for inference (no losses, no init_from).

    A stage-1 config without aligner or enhancer becomes a :class:`RescalerModel` unless ``lightweight``
    is false. Every way the stored config can fail to rebuild (unreadable YAML, a class that no longer
    exists, a backbone that cannot be loaded here) is a :class:`CheckpointError` naming the checkpoint.
    """
    load_plugins(data=False)
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
    stage1 = model_cfg.get("stage", "rescaler") == "rescaler"
    if lightweight and stage1 and not model_cfg.get("aligner") and not model_cfg.get("enhancer"):
        model_cfg = {k: v for k, v in model_cfg.items() if k in ("backbone", "rescaler", "scale")}
        parser = _rescaler_model_parser()
    else:
        parser = _model_parser()
    try:
        ns = parser.parse_object({"model": model_cfg})
        # jsonargparse 4.49 renamed instantiate_classes to instantiate
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(ns).model
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

    load_plugins(data=False)
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
