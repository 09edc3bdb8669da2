"""A ``tadm demo`` job's progress and Stop: each tile the codec runs reports progress and checks Stop
(:class:`Job`, with no change to the codec or the commands), and each browser session's Stop button stops its
own job (:class:`SessionJobs`).

Apart from :mod:`tadm.demo.round_trip` because :class:`Job` is the one piece that reaches into the model's parts
while a job runs (it wraps their methods on the instances for the job's duration only).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tadm.errors import TadmError
from tadm.inference.codec import Codec
from tadm.inference.tiling import enhancer_tiles, tile_starts

#: ``progress(fraction in [0, 1], text)``
ProgressFn = Callable[[float, str], None]
#: a wrapped method the instance did not hold itself (its class's): unwrapping deletes the wrapper
_ABSENT = object()


class Cancelled(TadmError, RuntimeError):
    """The user pressed Stop: raised at the next tile of the running job."""


class Job:
    """Counts the model's calls while a job runs: each rescaler tile, VAE tile and enhancer tile reports
    progress and checks Stop. The calls are wrapped on the instances for the job's duration only."""

    #: (attribute owner, method): what a tile of each kind calls
    WRAPPED = (
        ("rescaler", "downscale"),
        ("rescaler", "upscale"),
        ("backbone", "encode"),
        ("backbone", "decode"),
    )

    def __init__(
        self,
        codec: Codec,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        phases: dict[str, tuple[float, float]],
    ) -> None:
        self.codec, self.progress, self.cancel, self.phases = codec, progress, cancel, phases
        self.phase_name = next(iter(phases))
        self.calls: dict[str, int] = {}
        self._totals: dict[str, dict[str, int]] = {}

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.calls = {}
        self.report(self.phases[name][0], name)

    def report(self, fraction: float, text: str) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, fraction)), text)

    def _tick(self, kind: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("stopped")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        lo, hi = self.phases[self.phase_name]
        done = self.calls.get("rescaler", 0) + self.calls.get("enhancer", 0)
        total = max(done, self.expected)
        counts = ", ".join(
            f"{k} tile {n}" + (f"/{self.totals[k]}" if k in self.totals else "")
            for k, n in self.calls.items()
        )
        self.report(lo + (hi - lo) * done / max(total, 1), f"{self.phase_name}: {counts}")

    @property
    def totals(self) -> dict[str, int]:
        return self._totals.get(self.phase_name, {})

    @property
    def expected(self) -> int:
        return sum(self.totals.values())

    @contextlib.contextmanager
    def instrumented(self) -> Iterator[None]:
        m = self.codec.module
        wrapped: list[tuple[Any, str, Any]] = []

        def wrap(owner: Any, method: str, kind: str) -> None:
            inner = getattr(owner, method)

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._tick(kind)
                return inner(*args, **kwargs)

            wrapped.append((owner, method, vars(owner).get(method, _ABSENT)))
            object.__setattr__(owner, method, counted)

        try:
            for part, method in self.WRAPPED:
                wrap(getattr(m, part), method, "rescaler" if part == "rescaler" else "VAE")
            if m.enhance_fn is not None:
                wrap(m.backbone, "predict", "enhancer")
            yield
        finally:
            for owner, method, before in reversed(wrapped):
                if before is _ABSENT:
                    object.__delattr__(owner, method)
                else:
                    object.__setattr__(owner, method, before)

    def plan(self, hr_size: tuple[int, int]) -> None:
        """Expected rescaler and enhancer tiles of both phases for an HR image (what the progress counts)."""
        c = self.codec
        m, tiling, s, f = c.pad_multiple, c.tiling, c.scale, c.module.backbone.downsample_factor
        gh, gw = -(-hr_size[0] // m) * m // s, -(-hr_size[1] // m) * m // s
        lr_tiles = _grid_tiles(gh, gw, tiling.lr_tile, 2 * tiling.lr_overlap)
        self._totals = {"downscale": {"rescaler": lr_tiles}, "restore": {"rescaler": lr_tiles}}
        if c.module.enhance_fn is not None:
            tile, overlap = enhancer_tiles(tiling, c.module.backbone.latent_multiple)
            n = _grid_tiles(gh * s // f, gw * s // f, tile, overlap, c.module.backbone.latent_multiple)
            self._totals["restore"]["enhancer"] = -(-n // tiling.tile_batch)


def _grid_tiles(h: int, w: int, tile: int, overlap: int, align: int = 1) -> int:
    """How many tiles :mod:`tadm.inference.tiling` cuts an ``h`` x ``w`` grid into (1 when it fits one tile)."""
    if tile <= 0 or (h <= tile and w <= tile):
        return 1
    th, tw = min(tile, h), min(tile, w)
    return len(tile_starts(h, th, overlap, align)) * len(tile_starts(w, tw, overlap, align))


class SessionJobs:
    """The running job of each browser session, so that its Stop stops that job and no other."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, key: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[key] = event
        return event

    def end(self, key: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(key) is event:
                del self._events[key]

    def stop(self, key: str) -> bool:
        """Ask the session's running job to stop; False when none runs."""
        with self._lock:
            event = self._events.get(key)
        if event is None:
            return False
        event.set()
        return True
