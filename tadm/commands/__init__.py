"""The commands (top layer): ``tadm fit/validate/test/predict`` (LightningCLI) and ``list``, ``shard``,
``downscale``, ``upscale``, ``evaluate``, ``export``. They share one per-file loop, one progress bar
(rich) and one exit-code convention (:mod:`tadm.commands.common`). May import every layer below.
"""
