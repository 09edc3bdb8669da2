"""tadm's public test kit: random-weight twins of the backbones, stand-ins for downloaded loss networks,
and contract checks any rescaler, backbone or aligner (built-in or third-party) can run in one line::

    from tadm.testing import check_aligner, check_backbone, check_rescaler

    check_rescaler(MyRescaler(scale=16, latent_channels=4))
    check_aligner(MyAligner(t_min=10.0, t_max=200.0))
    check_backbone(MyBackbone(preset="tiny"))

Each runs every property of its kind's contract (shapes, dtypes, value ranges, timesteps within [t_min,
t_max], gradients reaching every trainable parameter, a state-dict round trip, a training step of tadm's
module on the tiny Stable Diffusion twin) and raises AssertionError naming the first property broken.
``RescalerContractTests`` / ``AlignerContractTests`` / ``BackboneContractTests`` run the same as pytest
tests of a class that inherits them. Importing this package is cheap: the checks import diffusers and
Lightning only when a stage step needs them.

Production code never imports this package; it may import every other part of tadm.
"""

from tadm.testing.aligner_checks import ALIGNER_PROPERTIES, check_aligner
from tadm.testing.backbone_checks import BACKBONE_PROPERTIES, check_backbone
from tadm.testing.contract_tests import AlignerContractTests, BackboneContractTests, RescalerContractTests
from tadm.testing.rescaler_checks import RESCALER_PROPERTIES, check_rescaler

__all__ = [
    "ALIGNER_PROPERTIES",
    "BACKBONE_PROPERTIES",
    "RESCALER_PROPERTIES",
    "AlignerContractTests",
    "BackboneContractTests",
    "RescalerContractTests",
    "check_aligner",
    "check_backbone",
    "check_rescaler",
]
