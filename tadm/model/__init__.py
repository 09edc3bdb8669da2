"""The model, apart from any training loop: :class:`TADMModel` (a plain ``nn.Module``: rescaler, backbone,
aligner and the one-step enhancer; ``downscale`` / ``upscale``; built from a checkpoint or an export), the
hybrid scheduler + Refiner (:mod:`~tadm.model.enhancer`), checkpoint files and exports (ONNX, the authors'
release import), the EMA arithmetic and the loading of a checkpoint as a codec.

No Lightning here. Uses plug-ins only through :mod:`tadm.contracts`; may import config building,
:mod:`tadm.inference`, :mod:`tadm.evaluation`, the data layer and the bottom layer; never training,
studies or commands.
"""

from tadm.model.tadm_model import TADMModel

__all__ = ["TADMModel"]
