"""The bottom layer's contracts: the three plug-in kinds and their registries.

A plug-in subclasses one base class and registers a short name::

    from tadm.contracts import RESCALERS, Rescaler

    @RESCALERS.register("my_rescaler")
    class MyRescaler(Rescaler): ...

Everything the core calls on a plug-in is declared on these base classes. This package may import
only :mod:`tadm.ops` and :mod:`tadm.errors` (``pyproject.toml``'s import-linter contracts check it).
"""

from tadm.contracts.aligner import ALIGNERS, TimestepAligner
from tadm.contracts.backbone import BACKBONES, STAGE_PARTS, DiffusionBackbone
from tadm.contracts.registry import Registry, RegistryError
from tadm.contracts.rescaler import RESCALERS, Distance, Rescaler, quantize_8bit

#: every plug-in kind, in the order ``tadm list`` prints them
ALL_REGISTRIES: tuple[Registry, ...] = (RESCALERS, BACKBONES, ALIGNERS)

__all__ = [
    "ALIGNERS",
    "ALL_REGISTRIES",
    "BACKBONES",
    "RESCALERS",
    "STAGE_PARTS",
    "DiffusionBackbone",
    "Distance",
    "Registry",
    "RegistryError",
    "Rescaler",
    "TimestepAligner",
    "quantize_8bit",
]
