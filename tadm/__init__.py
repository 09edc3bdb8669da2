"""tadm: extreme image rescaling (x16, x32) with diffusion priors, on PyTorch Lightning.

The package is built in layers; imports point down only (``pyproject.toml``'s import-linter
contracts, checked by ``make test``):

    testing/      the public test kit: backbone twins, contract checks (never imported by the rest)
    commands/     tadm fit/list/shard/downscale/upscale/evaluate/export/study/compare ...
    training/     the LightningModule (stages 1-3), EMA callback, callbacks, losses  |  studies/  study plans, comparisons
    model/        TADMModel (a plain nn.Module), enhancer, checkpoints, exports, codec loading
    config/       YAML -> objects: plug-in discovery, argument links
    inference/    round-trip pipeline, tiling, heat maps, LR files, codec   |  evaluation/  metrics, reports
    components/   plug-ins: rescalers/, backbones/, aligners/              |  datamodules/ data, shards, inputs
    contracts/    Rescaler, DiffusionBackbone, TimestepAligner + registries
    ops/ errors   shared building blocks (network blocks, image and schedule math, atomic writes), errors

``components`` and ``datamodules`` sit at the repository's top level and are installed as
``tadm.components`` / ``tadm.datamodules``.
"""

__version__ = "0.1.0"
