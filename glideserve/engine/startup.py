"""StartupProgress: what a backend's start-up is doing, for a server that listens meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Callable


class StartupProgress:
    """A record of the start-up stage, written by the loading thread and read by ``/ready``.

    A stage names what is done to which model (``loading``, ``compiling``, ``profiling``)
    and, where it has countable units (compiled bucket shapes), how many of how many are
    done. Every method is thread-safe; ``snapshot`` is a JSON-ready copy and ``describe``
    one sentence for a human. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._stage = "starting"
        self._model: str | None = None
        self._done: int | None = None
        self._total: int | None = None
        self._unit = ""
        self._detail = ""

    def begin(self, stage: str, model: str | None = None, total: int | None = None, unit: str = "",
              detail: str = "") -> None:
        """Enter ``stage`` for ``model``; with ``total``, progress counts from 0 of ``total`` ``unit``."""
        with self._lock:
            self._stage, self._model, self._detail = stage, model, detail
            self._total, self._unit = total, unit
            self._done = 0 if total is not None else None

    def advance(self, done: int, detail: str = "") -> None:
        """``done`` units of the current stage's total are finished (``detail``: the last one)."""
        with self._lock:
            self._done, self._detail = done, detail

    def note(self, detail: str) -> None:
        """What the current stage is doing now, for a stage without countable units."""
        with self._lock:
            self._detail = detail

    def snapshot(self) -> dict:
        with self._lock:
            return {"stage": self._stage, "model": self._model, "done": self._done, "total": self._total,
                    "unit": self._unit, "detail": self._detail, "elapsed_s": round(self._clock() - self._started, 1)}

    def describe(self) -> str:
        s = self.snapshot()
        text = s["stage"] + (f" {s['model']}" if s["model"] else "")
        if s["total"] is not None:
            text += f": {s['done']} of {s['total']}" + (f" {s['unit']}" if s["unit"] else "")
        if s["detail"]:
            text += f" ({s['detail']})"
        return f"{text}; {s['elapsed_s']:.0f} s since start-up"
