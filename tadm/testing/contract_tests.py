"""pytest-friendly forms of the contract checks: inherit one in a test class and each group of properties
runs as its own test (diffusers' ``ModelTesterMixin`` pattern)::

    from tadm.testing import AlignerContractTests

    class TestMyAligner(AlignerContractTests):
        def make_aligner(self):
            return MyAligner(t_min=10.0, t_max=200.0)

The base classes' names do not start with ``Test``, so pytest collects only your subclass. Options of the
one-line checks go into ``check_options`` (e.g. ``{"stages": ()}`` to skip the stage step).
"""

from __future__ import annotations

from typing import Any, ClassVar

from tadm.contracts import DiffusionBackbone, Rescaler, TimestepAligner
from tadm.testing.aligner_checks import check_aligner
from tadm.testing.backbone_checks import check_backbone
from tadm.testing.rescaler_checks import check_rescaler


class RescalerContractTests:
    """Every rescaler contract check, in four tests; implement :meth:`make_rescaler`."""

    check_options: ClassVar[dict[str, Any]] = {}

    def make_rescaler(self) -> Rescaler:
        raise NotImplementedError("return the rescaler to check, as a config would build it")

    def _check(self, *only: str) -> None:
        check_rescaler(self.make_rescaler(), only=only, **self.check_options)

    def test_outputs(self) -> None:
        self._check("downscale", "8-bit in eval", "upscale", "deterministic in eval")

    def test_training(self) -> None:
        self._check("training losses", "gradients")

    def test_state_dict_round_trip(self) -> None:
        self._check("state dict round trip")

    def test_stage_step(self) -> None:
        self._check("stage step")


class AlignerContractTests:
    """Every aligner contract check, in four tests; implement :meth:`make_aligner`."""

    check_options: ClassVar[dict[str, Any]] = {}

    def make_aligner(self) -> TimestepAligner:
        raise NotImplementedError("return the aligner to check, as a config would build it")

    def _check(self, *only: str) -> None:
        check_aligner(self.make_aligner(), only=only, **self.check_options)

    def test_outputs(self) -> None:
        self._check("latent channels", "attach time", "timesteps", "deterministic in eval")

    def test_training(self) -> None:
        self._check("gradients")

    def test_state_dict_round_trip(self) -> None:
        self._check("state dict round trip")

    def test_stage_step(self) -> None:
        self._check("stage step")


class BackboneContractTests:
    """Every backbone contract check, in five tests; implement :meth:`make_backbone` (a fresh, unloaded
    random-weight twin)."""

    check_options: ClassVar[dict[str, Any]] = {}

    def make_backbone(self) -> DiffusionBackbone:
        raise NotImplementedError("return a freshly constructed (unloaded) backbone with random weights")

    def _check(self, *only: str) -> None:
        check_backbone(self.make_backbone(), only=only, **self.check_options)

    def test_loading(self) -> None:
        self._check("construction", "stage loading", "trainable parameters")

    def test_outputs(self) -> None:
        self._check("encode decode", "predict")

    def test_training(self) -> None:
        self._check("gradients")

    def test_state_dict_round_trip(self) -> None:
        self._check("state dict round trip")

    def test_stage_step(self) -> None:
        self._check("stage step")
