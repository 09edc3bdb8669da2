"""What a checkpoint's trained tensors are and how they load over a frozen backbone.

One place for the rules :class:`~tadm.training.lightning_module.TADMModule` (training, Lightning) and the codec's
Lightning-free stage-1 model (:class:`tadm.config.build.RescalerModel`) share, so the two cannot drift:
which state-dict keys are frozen (never stored), which checkpoints fit a model, and the errors for ones
that do not. Torch only: the codec imports it without Lightning.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from tadm.contracts import DiffusionBackbone
from tadm.errors import CheckpointError

log = logging.getLogger(__name__)


def frozen_backbone_keys(backbone: DiffusionBackbone, stage: str, prefix: str = "backbone.") -> set[str]:
    """State-dict keys of the backbone that checkpoints do not store: all but its trainable parameters
    in ``stage`` (LoRA, unfrozen layers), and every buffer."""
    trainable = {id(p) for p in backbone.trainable_parameters(stage)}
    keys = {f"{prefix}{name}" for name, p in backbone.named_parameters() if id(p) not in trainable}
    return keys | {f"{prefix}{name}" for name, _ in backbone.named_buffers()}


def check_compatible(
    meta: dict[str, Any] | None, source: str, *, backbone_id: str, scale: int, pixel_rescaler: bool
) -> None:
    """Refuse a checkpoint trained on another backbone or at another scale (naming both). A stage-1
    checkpoint of a pixel rescaler holds no weight that depends on the backbone: any backbone takes it
    (IRN trained without a VAE, then enhanced with SD: the "pixel rescaling + SD prior" ablation)."""
    if not meta:
        return
    backbone_free = meta.get("stage") == "rescaler" and pixel_rescaler
    if meta.get("backbone_id") != backbone_id and not backbone_free:
        raise CheckpointError(
            f"checkpoint {source} was trained with backbone {meta.get('backbone_id')!r}, "
            f"but this model uses {backbone_id!r}; use the same backbone config"
        )
    if meta.get("scale") not in (None, scale):
        raise CheckpointError(f"checkpoint {source} is for scale x{meta['scale']}, this model is x{scale}")


def load_trained_state(
    module: nn.Module, state: dict[str, Tensor], source: str, frozen: set[str], require_all: bool = True
) -> None:
    """Load stored (trained) tensors over the frozen ones; unknown keys and shape mismatches are a
    :class:`CheckpointError`, and so are missing trained tensors when ``require_all`` (inference) -- a
    warning otherwise (``init_from``: the missing ones keep their initial values)."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches: one line per tensor from torch
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(lines[:3]) or str(err).splitlines()[0]}"
            + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")
        ) from err
    unexpected = list(result.unexpected_keys)
    if unexpected:
        raise CheckpointError(f"{source} has weights this model does not: {unexpected[:8]}")
    missing = sorted(set(result.missing_keys) - frozen)
    if missing and require_all:
        raise CheckpointError(
            f"{source} lacks trained weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if missing:
        log.warning(
            "init_from %s: %d trainable tensors not in the checkpoint keep their initial values: %s",
            source,
            len(missing),
            missing[:8],
        )
