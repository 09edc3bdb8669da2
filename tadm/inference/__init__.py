"""Inference: the HR -> 8-bit LR -> HR round trip (:mod:`~tadm.inference.pipeline`), tiling, timestep
heat maps, LR files and the :class:`~tadm.inference.codec.Codec` wrapper around a loaded model.

Works on the contracts (a model is anything with a backbone, a rescaler and an enhance step); may
import the data layer and the bottom layer, never :mod:`tadm.model`, config building or commands.
"""
