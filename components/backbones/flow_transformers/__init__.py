"""The rectified-flow transformer families (SD 3.5, FLUX.1): ``flow_backbone`` (what both share: the
prompt embedding, dtype, flow time, transformer LoRA), ``sd3_backbone`` and ``flux_backbone`` (the
registered backbones), ``flow_presets`` (named variants), ``flow_weight_loading`` (their module classes over
the shared diffusers loader), ``prompt_embedding_file`` (the ``tadm embed-prompt`` file)."""

from tadm.components.backbones.flow_transformers.flux_backbone import FluxBackbone
from tadm.components.backbones.flow_transformers.sd3_backbone import SD3Backbone

__all__ = ["FluxBackbone", "SD3Backbone"]
