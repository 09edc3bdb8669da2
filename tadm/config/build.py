"""YAML -> objects, in one place: the argument links every parser shares, a model class from a run
config, and the backbone alone (``tadm shard --latents``).

Values written once and linked (LightningCLI's ``link_arguments``): ``model.scale`` into the rescaler
and the data module, the backbone's latent layout into the rescaler.

The model class is passed in (:class:`tadm.model.TADMModel`, a layer above): config building knows
jsonargparse and the plug-ins, not the model. Plain jsonargparse, no Lightning: importing Lightning
(with torchmetrics, torchvision, scipy and transformers behind it) costs seconds a codec call on the
shipped quickstart model has no use for (``benchmarks/startup.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tadm.config.plugins import load_plugins
from tadm.contracts import DiffusionBackbone
from tadm.errors import CheckpointError, TadmError

ModelT = TypeVar("ModelT")


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


def build_from_config(
    model_cls: type[ModelT],
    config_yaml: str,
    source: str,
    backbone_pretrained: str | None = None,
    then: Callable[[ModelT], Any] | None = None,
) -> ModelT:
    """The ``model_cls`` a run config describes (YAML text, e.g. a checkpoint's stored config), built for
    inference: only the ``model:`` keys ``model_cls.__init__`` takes are read, so a training run's losses,
    optimiser, ``init_from`` and logging options are left to training.

    ``backbone_pretrained`` replaces the backbone's ``pretrained`` folder / hub id; ``then`` runs on the built
    object (e.g. loading its frozen weights) under the same error handling. Every way the config can
    fail to rebuild (unreadable YAML, a class that no longer exists, a backbone that cannot be loaded here)
    is a :class:`CheckpointError` naming ``source``. Plain jsonargparse, no Lightning: the codec imports this.
    """
    from jsonargparse import ArgumentParser

    load_plugins(data=False)
    model_cfg = dict(parse_run_config(config_yaml, source)["model"])
    if backbone_pretrained is not None:
        model_cfg["backbone"] = _with_pretrained(model_cfg.get("backbone"), backbone_pretrained, source)
    accepted = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    model_cfg = {k: v for k, v in model_cfg.items() if k in accepted}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model_cls, "model")
    link_model_arguments(parser, with_data=False)
    try:
        model = parser.instantiate(parser.parse_object({"model": model_cfg})).model
        if then is not None:
            then(model)
        return model
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


def parse_run_config(config_yaml: str, source: str) -> dict[str, Any]:
    """A checkpoint's stored run config (YAML text), parsed and checked for the shape every reader relies on:
    a mapping whose ``model`` is a non-empty mapping of the model's options, in which every component given
    as ``{class_path: ..., init_args: ...}`` has a ``class_path`` string and ``init_args`` as a mapping.

    Anything else (bad YAML, ``model: 5``, ``class_path: 5``) is a one-line :class:`CheckpointError` naming
    ``source`` (the file), not a ``TypeError`` from deep inside the rebuild.
    """
    damaged = "the file is damaged or was not written by tadm"
    try:
        cfg = yaml.safe_load(config_yaml)
    except (yaml.YAMLError, RecursionError) as err:  # RecursionError: nested deeper than Python recurses
        raise CheckpointError(
            f"checkpoint {source}: its stored run config is not valid YAML ({_first_line(err)})"
        ) from err
    if cfg is not None and not isinstance(cfg, dict):
        raise CheckpointError(
            f"checkpoint {source}: its stored run config is {_a(cfg)}, not a mapping of sections "
            f"(model, trainer, data); {damaged}"
        )
    model = (cfg or {}).get("model")
    if model is None or model == {}:
        raise CheckpointError(f"checkpoint {source} holds no model config; was it written by tadm?")
    if not isinstance(model, dict):
        raise CheckpointError(
            f"checkpoint {source}: the 'model' section of its stored run config is {_a(model)}, not a "
            f"mapping of the model's options; {damaged}"
        )
    for key, node in _components(model, "model", set()):
        class_path, init_args = node.get("class_path"), node.get("init_args")
        if init_args is not None and not isinstance(init_args, dict):
            raise CheckpointError(
                f"checkpoint {source}: {key}.init_args in its stored run config is {_a(init_args)}, "
                f"not a mapping of arguments; {damaged}"
            )
        if not (isinstance(class_path, str) and class_path.strip()):
            raise CheckpointError(
                f"checkpoint {source}: {key}.class_path in its stored run config is "
                f"{_a(class_path)}, not a class name; {damaged}"
            )
    return cfg


def _components(node: Any, key: str, seen: set[int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted key, mapping) of every mapping under ``node`` that names a class (``class_path`` /
    ``init_args``); ``seen`` guards against a YAML alias that makes the tree a cycle."""
    if id(node) in seen or not isinstance(node, (dict, list)):
        return
    seen.add(id(node))
    if isinstance(node, dict):
        if "class_path" in node or "init_args" in node:
            yield key, node
        for k, v in node.items():
            yield from _components(v, f"{key}.{k}", seen)
    else:
        for i, v in enumerate(node):
            yield from _components(v, f"{key}[{i}]", seen)


def _a(value: Any) -> str:
    """A stored value in a message: its type and (short) text, ``an int (5)``, ``missing``."""
    if value is None:
        return "missing"
    text, name = repr(value), type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name} ({text if len(text) <= 40 else text[:37] + '...'})"


def _first_line(err: BaseException) -> str:
    """The first line of an error; jsonargparse's ``Parser key "model.scale":`` with the line that says why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines[0] = f"{lines[0]} {lines[1]}"
    return lines[0][:300] if lines else type(err).__name__


def takes_argument(cls: type, name: str) -> bool:
    """Whether ``cls(name=...)`` is accepted: its ``__init__`` names it, or passes ``**kwargs`` up to a base
    class's that does (the SD 3 / FLUX backbones take the shared diffusers arguments that way)."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _with_pretrained(backbone_cfg: Any, pretrained: str, source: str) -> dict[str, Any]:
    """The stored backbone config with ``pretrained`` replaced; an error when that backbone takes none."""
    import importlib

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
    if not takes_argument(cls, "pretrained"):
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
    return parser.instantiate(cfg).backbone


def _parse_onto(parser: Any, obj: dict[str, Any], base: Any) -> Any:
    """``parse_object`` onto an earlier result, so later configs override earlier ones."""
    return parser.parse_object(obj) if base is None else parser.parse_object(obj, namespace=base)
