"""Named variants of the diffusers backbones and the families their weights belong to.

A :class:`Variant` records what is known about a variant *without loading it* (family, hub id, the
latent shape and its scaling / shift), so a CLI can link ``latent_channels`` before any weights exist;
each family adds what is its own (:mod:`~tadm.components.backbones.stable_diffusion.unet_presets`,
:mod:`~tadm.components.backbones.flow_transformers.flow_presets`). Each family's table is entered in
:data:`KNOWN_VARIANTS` when it is defined, so :func:`family_hint` can name the variants that fit
weights of another family without the loaders importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class Variant:
    """What is known about a variant before loading it.

    ``latent_channels``, ``downsample_factor``, ``scaling_factor`` and ``shift_factor`` are the
    fallbacks a backbone reports until its VAE is loaded (then it reads them from the VAE config).
    """

    name: str
    family: str
    hub_id: str | None
    description: str = ""
    #: native training resolution in pixels
    resolution: int = 512
    latent_channels: int = 4
    downsample_factor: int = 8
    scaling_factor: float = 0.18215
    #: z = (E(x) - shift_factor) * scaling_factor; the SD VAEs have none, SD 3 / FLUX have one
    shift_factor: float = 0.0


V = TypeVar("V", bound=Variant)

#: every shipped variant by name, of every family (filled by :func:`variant_table`)
KNOWN_VARIANTS: dict[str, Variant] = {}


def variant_table(variants: Iterable[V]) -> dict[str, V]:
    """The variants by name, also entered in :data:`KNOWN_VARIANTS` for :func:`family_hint`."""
    table = {v.name: v for v in variants}
    KNOWN_VARIANTS.update(table)
    return table


def find_variant(table: Mapping[str, V], name: str | V, family: str | None = None) -> V:
    """Look a variant up by name (and check its family), with the known names in the error."""
    variant = table.get(name) if isinstance(name, str) else name
    fits = [n for n, v in table.items() if family is None or v.family == family]
    if variant is None:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {', '.join(fits)}")
    if family is not None and variant.family != family:
        raise ValueError(
            f"backbone preset {variant.name!r} is a {variant.family} preset, not {family}; "
            f"use one of {', '.join(fits)} (or the {variant.family} backbone)"
        )
    return variant


def family_of_class(name: str) -> str | None:
    """The tadm family a diffusers pipeline / transformer class name belongs to (None: unknown)."""
    if "StableDiffusion3" in name or name.startswith("SD3"):
        return "sd3"
    if "Flux" in name:
        return "flux"
    if "StableDiffusionXL" in name:
        return "sdxl"
    if "StableDiffusion" in name or name.startswith("UNet2D"):
        return "stable_diffusion"
    return None


def family_hint(family: str | None) -> str:
    """Which presets (and backbone configs) fit weights of ``family``."""
    if family in ("sd3", "flux"):
        names = [v.name for v in KNOWN_VARIANTS.values() if v.family == family]
        configs = ", ".join(f"configs/backbone/{n}.yaml" for n in names)
        return f"Use the {family} backbone with preset {' or '.join(repr(n) for n in names)} ({configs})."
    if family in ("sdxl", "stable_diffusion"):
        return "Use the stable_diffusion backbone (configs/backbone/sd21-base.yaml, sdxl.yaml, ...)."
    return "Give a diffusers folder or hub id of this family."
