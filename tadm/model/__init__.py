"""The core model: :class:`~tadm.training.lightning_module.TADMModule` (stages 1-3), its one-step enhancer (hybrid
scheduler + Refiner), losses, callbacks, LR schedules and checkpoint files.

Uses plug-ins only through :mod:`tadm.contracts`; may import :mod:`tadm.inference`,
:mod:`tadm.evaluation`, the data layer and the bottom layer, never config building or commands.
"""
