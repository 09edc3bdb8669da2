"""Random-weight twins and stand-ins, so every code path runs on a CPU without a download.

``unet_twins`` (:class:`~tadm.testing.twins.unet_twins.StableDiffusionTwin`: tiny SD 1.5 / 2.1 / SDXL) and
``flow_twins`` (:class:`~tadm.testing.twins.flow_twins.SD3Twin`, :class:`~tadm.testing.twins.flow_twins.FluxTwin`)
are the real backbones with parts built from small random configs; choose one in YAML by its class path
(``--model.backbone=tadm.testing.twins.unet_twins.StableDiffusionTwin``). ``random_text_encoders`` builds
the CLIP / T5 tokenizers from scratch, ``vgg16_stand_in`` writes random VGG16 weights where torchvision
looks for them (LPIPS / DISTS offline), and ``full_size_architectures`` holds the real architectures'
configs for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

#: the twin backbone class of each twin preset, as YAML names it (``class_path``)
TWIN_CLASS_PATHS: dict[str, str] = {
    "tiny-sd15": "tadm.testing.twins.unet_twins.StableDiffusionTwin",
    "tiny-sd21": "tadm.testing.twins.unet_twins.StableDiffusionTwin",
    "tiny-sdxl": "tadm.testing.twins.unet_twins.StableDiffusionTwin",
    "tiny-sd3": "tadm.testing.twins.flow_twins.SD3Twin",
    "tiny-flux": "tadm.testing.twins.flow_twins.FluxTwin",
}


def twin_args(preset: str, prefix: str = "--model.backbone") -> list[str]:
    """Command-line arguments that put the twin ``preset`` (e.g. ``tiny-sd21``) in place of a config's backbone
    (its other ``init_args`` carry over): the class path, then the preset."""
    return [f"{prefix}={TWIN_CLASS_PATHS[preset]}", f"{prefix}.init_args.preset={preset}"]


def twin_section(preset: str) -> dict[str, object]:
    """The ``model.backbone`` YAML section of the twin ``preset``, to compose after a config."""
    return {"class_path": TWIN_CLASS_PATHS[preset], "init_args": {"preset": preset}}


def write_twin_config(preset: str, path: str | Path) -> Path:
    """A YAML file whose ``model.backbone`` is the twin ``preset``: composed after a config (``--config``,
    ``--backbone``, ``--latents``), it swaps that config's backbone for the twin (other ``init_args`` carry over)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump({"model": {"backbone": twin_section(preset)}}), encoding="utf-8")
    return path
