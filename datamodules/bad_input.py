"""One policy for unreadable training and evaluation inputs, shared by every data module.

``on_bad_image="skip"`` (the default) warns about a bad image or sample, leaves it out and counts it;
``"error"`` raises at the first one (for debugging a data set). Counting has to work where decoding
happens, which is often a DataLoader worker process whose counters the main process never sees. So the
worker side (:class:`SkipCounter`) tags every sample with its running count, and the main process
(:class:`SkipCollector`, fed by the data module's ``on_before_batch_transfer``) takes the tags out of
each batch, keeps the total, logs it as ``data/num_skipped`` and reports it per rank at teardown.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

BadInputPolicy = Literal["error", "skip"]
#: the data modules' default: a long run should not die on one bad photo in a million
DEFAULT_POLICY: BadInputPolicy = "skip"
#: per counter: after this many warnings, further skips are only counted
MAX_SKIP_WARNINGS = 20
#: batch keys carrying the counters from the workers to the main process (removed before the model sees them)
COUNT_KEY = "_skipped"
SOURCE_KEY = "_source"
METRIC = "data/num_skipped"


class InputSkippedWarning(UserWarning):
    """A bad image or sample was left out and counted; filterable apart from other warnings."""


def check_policy(on_bad_image: str) -> BadInputPolicy:
    """The policy, or a ValueError naming the option."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    return on_bad_image  # type: ignore[return-value]


class SkipCounter:
    """Counts (and warns about, up to :data:`MAX_SKIP_WARNINGS`) what one process or worker leaves out.

    Args:
        source: Names this counter among all that feed one collector, e.g. ``"train/w0"``. Counts of one
            source only grow; a new iteration that counts from zero again needs a new source name.
        policy: ``"skip"`` warns and counts; ``"error"`` re-raises the problem.
        quiet: Count without warning (a look-ahead whose skips are not the user's concern).
    """

    def __init__(self, source: str, policy: BadInputPolicy, quiet: bool = False) -> None:
        self.source = source
        self.policy = policy
        self.quiet = quiet
        self.count = 0
        self.pid = os.getpid()

    def skip(self, problem: BaseException, what: str | None = None) -> None:
        """Leave one input out: raise ``problem`` under ``"error"``, else warn (naming ``what``) and count."""
        if self.policy == "error":
            raise problem
        self.count += 1
        if self.quiet or self.count > MAX_SKIP_WARNINGS:
            return
        more = f" (further skips are only counted: {METRIC})" if self.count == MAX_SKIP_WARNINGS else ""
        subject = f"{what}: " if what else ""
        warnings.warn(f"skipping {subject}{problem}{more}", InputSkippedWarning, stacklevel=2)

    def tag(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Put the running count into ``sample``; :meth:`SkipCollector.collect` takes it out of the batch."""
        sample[COUNT_KEY] = self.count
        sample[SOURCE_KEY] = self.source
        return sample


class SkipCollector:
    """The main process's view: every counter's latest count, their total, and what was logged."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._logged = 0

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def update(self, source: str, count: int) -> None:
        """Record ``source``'s running count (counts only grow, so a late, smaller tag changes nothing)."""
        self._counts[source] = max(self._counts.get(source, 0), int(count))

    def collect(self, batch: Any, trainer: Any) -> Any:
        """Take the counters out of a collated batch, then log the total if it grew."""
        if isinstance(batch, dict) and COUNT_KEY in batch:
            counts = batch.pop(COUNT_KEY)
            sources = batch.pop(SOURCE_KEY)
            for source, count in zip(sources, counts.tolist(), strict=True):
                self.update(source, count)
            self.log(trainer)
        return batch

    def log(self, trainer: Any) -> None:
        """Log the total as ``data/num_skipped`` to the trainer's logger, when it grew since last time."""
        logger = getattr(trainer, "logger", None)
        total = self.total
        if total > self._logged and logger is not None:
            logger.log_metrics({METRIC: total}, step=int(getattr(trainer, "global_step", 0)))
            self._logged = total

    def report(self, rank: int) -> None:
        """One warning per rank with its total (only rank 0's count reaches the logger)."""
        if self.total:
            warnings.warn(
                f"rank {rank}: {self.total} unreadable or unusable input(s) were skipped "
                f"(see the warnings; logged as {METRIC})",
                InputSkippedWarning,
                stacklevel=3,
            )
