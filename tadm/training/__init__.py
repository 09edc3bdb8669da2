"""Training: the LightningModule that wraps :class:`tadm.model.TADMModel` for the three stages (losses,
optimisers, logging), its callbacks (checkpoints, reports, the EMA) and LR schedules.

May import :mod:`tadm.model` and everything below it; never the commands, studies or the test kit.
"""
