"""The aligner keeps tadm's aligner contract: tadm.testing's checks (shapes, dtypes, t within [t_min, t_max],
gradients, state-dict round trip, a training step on tadm's tiny SD twin), in one line.
Run with `pytest tests` once the package and tadm are installed."""

from tadm_example_aligner import LatentStatsAligner

from tadm.testing import check_aligner


def test_aligner_contract() -> None:
    check_aligner(LatentStatsAligner(t_min=10.0, t_max=200.0))
