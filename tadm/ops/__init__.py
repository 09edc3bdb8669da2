"""The bottom layer's building blocks: network blocks shared by plug-ins and the core
(:mod:`~tadm.ops.blocks`), image tensor helpers (:mod:`~tadm.ops.images`), colour correction (:mod:`~tadm.ops.color_fix`), noise-schedule arithmetic
(:mod:`~tadm.ops.diffusion`) and atomic file writes (:mod:`~tadm.ops.files`).

Pure functions and ``nn.Module`` building blocks: this package imports nothing else of tadm.
"""
