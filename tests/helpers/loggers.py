"""A Lightning logger that records what it is given (the data modules log their skip counter through it)."""

from __future__ import annotations

from typing import Any

import lightning as L


class MetricsLogger(L.pytorch.loggers.Logger):
    """Records every ``log_metrics`` call as ``(metrics, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def metrics(self) -> list[dict[str, float]]:
        return [m for m, _ in self.calls]

    def values(self, name: str) -> list[float]:
        """Every value logged under ``name``, in order."""
        return [m[name] for m in self.metrics if name in m]

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
