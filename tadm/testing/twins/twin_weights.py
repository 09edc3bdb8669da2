"""How a twin differs from the backbone it stands in for: random weights from a small config.

:class:`RandomWeights` goes before a diffusers family's backbone class in a twin's bases. With no
``pretrained`` the twin builds every part it is asked for from the small configs of its module (``vae``
through the ``vae`` source when one is given, as the real backbone would); with ``pretrained`` it loads
exactly as the real backbone does. Nothing in the production loaders knows about twins.
"""

from __future__ import annotations

from typing import Any

import torch


def seeded(seed: int, build: Any) -> Any:
    """Run ``build()`` under ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class RandomWeights:
    """Mixin for a twin of a :class:`~tadm.components.backbones.diffusers_base.diffusers_backbone.DiffusersBackbone`
    family; the twin supplies :meth:`build_random_parts` and presets with a ``seed``."""

    pretrained: str | None
    single_file: str | None
    vae_source: str | None
    preset: Any

    def build_random_parts(self, parts: list[str]) -> dict[str, Any]:
        """Random modules of ``parts``, keyed like the family's diffusers pipeline components."""
        raise NotImplementedError

    def _resolve_source(self, pretrained: str | None) -> str | None:
        """None (random weights) unless a weight source is given."""
        if pretrained is None and self.single_file is None:
            return None
        return super()._resolve_source(pretrained)  # type: ignore[misc]

    @property
    def source(self) -> str:
        return self.pretrained if self.pretrained is not None else f"random-seed{self.preset.seed}"

    def _build_parts(self, todo: list[str]) -> dict[str, Any]:
        if self.pretrained is not None:
            return super()._build_parts(todo)  # type: ignore[misc]
        need = [p for p in todo if not (p == "vae" and self.vae_source)]
        new = self.build_random_parts(need) if need else {}
        if "vae" in todo and "vae" not in new:
            new["vae"] = self._loader().load_vae()  # type: ignore[attr-defined]
        return new
