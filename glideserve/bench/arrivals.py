"""Arrival processes for open-loop load: when each request is sent, in seconds from the start.

Every function is pure and deterministic for a given seed, and returns a
:class:`Schedule` whose offsets are sorted. Trace files use DiffServe's
Azure-Functions layout: one request per line, ``arrival_ms,prompt_id``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """Sorted arrival offsets (seconds from the start of the run) and optional prompt ids.

    ``prompt_ids`` is ``None`` for synthetic processes (requests take prompts in
    order) and, for traces, holds one prompt index per arrival.
    """

    offsets: tuple[float, ...]
    prompt_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if any(b < a for a, b in zip(self.offsets, self.offsets[1:])):
            raise ValueError("arrival offsets must be sorted")
        if self.offsets and self.offsets[0] < 0:
            raise ValueError("arrival offsets must be >= 0")
        if self.prompt_ids is not None and len(self.prompt_ids) != len(self.offsets):
            raise ValueError("prompt_ids must have one entry per arrival")

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def span_s(self) -> float:
        """Seconds from the start to the last arrival."""
        return self.offsets[-1] if self.offsets else 0.0

    @property
    def mean_rate(self) -> float:
        """Arrivals per second over the span from 0 to the last arrival."""
        return len(self.offsets) / self.span_s if self.span_s > 0 else math.inf


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _count_or_duration(rate: float, duration_s: float | None, count: int | None) -> tuple[float | None, int | None]:
    _check_positive("rate", rate)
    _check_positive("duration_s", duration_s)
    if (duration_s is None) == (count is None):
        raise ValueError("give exactly one of duration_s (seconds of load) or count (number of requests)")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer, got {count!r}")
    return duration_s, count


def poisson_arrivals(rate: float, *, duration_s: float | None = None, count: int | None = None,
                     seed: int = 0) -> Schedule:
    """Poisson process at ``rate`` per second: exponential inter-arrival gaps with mean ``1/rate``.

    With ``duration_s`` every arrival before the duration is kept (the count is random);
    with ``count`` exactly that many arrivals are drawn. The first arrival is at 0 plus
    one gap, as in a process that started at time 0.
    """
    duration_s, count = _count_or_duration(rate, duration_s, count)
    rng = np.random.default_rng(seed)
    if count is not None:
        return Schedule(tuple(np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()))
    expected = rate * duration_s
    # Enough gaps to pass the duration with overwhelming probability; extend if not.
    gaps = rng.exponential(1.0 / rate, size=int(expected + 10 * math.sqrt(expected) + 20))
    times = np.cumsum(gaps)
    while times[-1] < duration_s:
        more = np.cumsum(rng.exponential(1.0 / rate, size=len(gaps))) + times[-1]
        times = np.concatenate([times, more])
    return Schedule(tuple(times[times < duration_s].tolist()))


def constant_arrivals(rate: float, *, duration_s: float | None = None, count: int | None = None) -> Schedule:
    """One request every ``1/rate`` seconds, the first at 0."""
    duration_s, count = _count_or_duration(rate, duration_s, count)
    if count is None:
        count = max(1, math.ceil(duration_s * rate - 1e-9))
    return Schedule(tuple(i / rate for i in range(count)))


def burst_arrivals(burst_size: int, interval_s: float, num_bursts: int) -> Schedule:
    """``burst_size`` requests at once every ``interval_s`` seconds, ``num_bursts`` times, the first at 0."""
    for name, value in (("burst_size", burst_size), ("num_bursts", num_bursts)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_positive("interval_s", interval_s)
    return Schedule(tuple(b * interval_s for b in range(num_bursts) for _ in range(burst_size)))


def load_trace(path: str | Path) -> Schedule:
    """Read an ``arrival_ms,prompt_id`` trace; a header line, if any, is skipped.

    Offsets are shifted so the first arrival is at 0 and sorted (ties keep file order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} not found; expected lines of 'arrival_ms,prompt_id'")
    rows: list[tuple[float, int]] = []
    with path.open(newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            try:
                arrival_ms, prompt_id = float(row[0]), int(row[1])
            except (ValueError, IndexError):
                if line_no == 1:
                    continue  # a header such as "arrival_ms,prompt_id"
                raise ValueError(f"{path}:{line_no}: expected 'arrival_ms,prompt_id', got {','.join(row)!r}") from None
            rows.append((arrival_ms, prompt_id))
    if not rows:
        raise ValueError(f"trace file {path} holds no arrivals")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return Schedule(tuple((ms - start) / 1000.0 for ms, _ in rows), tuple(pid for _, pid in rows))


def rescale(schedule: Schedule, *, target_rate: float | None = None, duration_s: float | None = None) -> Schedule:
    """Stretch or compress time so the mean rate becomes ``target_rate``, then cut to ``duration_s``.

    The mean rate is ``len / span`` (see :attr:`Schedule.mean_rate`); multiplying every
    offset by ``mean_rate / target_rate`` keeps the trace's shape and hits the target
    exactly. With ``duration_s`` only arrivals before it are kept. Either may be omitted.
    """
    _check_positive("target_rate", target_rate)
    _check_positive("duration_s", duration_s)
    offsets = np.asarray(schedule.offsets, dtype=float)
    ids = schedule.prompt_ids
    if target_rate is not None:
        if len(offsets) < 2 or schedule.span_s <= 0:
            raise ValueError("a schedule needs at least two distinct arrival times to be rescaled to a rate")
        offsets = offsets * (schedule.mean_rate / target_rate)
    if duration_s is not None:
        keep = int(np.searchsorted(offsets, duration_s, side="left"))
        offsets = offsets[:keep]
        ids = ids[:keep] if ids is not None else None
    return Schedule(tuple(offsets.tolist()), ids)


def fit_trace(schedule: Schedule, *, target_rate: float, duration_s: float, seed: int = 0) -> Schedule:
    """The whole trace squeezed into ``duration_s`` at mean rate ``target_rate``.

    Time is scaled so the trace's span becomes ``duration_s`` (its rate-over-time shape
    kept, e.g. the MAF traces' ramps), then arrivals are thinned uniformly at random
    (seeded) to ``round(target_rate * duration_s)``, which keeps that shape in
    expectation. A trace with too few arrivals for the target is an error: arrivals
    are never invented.
    """
    _check_positive("target_rate", target_rate)
    _check_positive("duration_s", duration_s)
    if len(schedule) < 2 or schedule.span_s <= 0:
        raise ValueError("a trace needs at least two distinct arrival times to be fitted")
    wanted = max(1, round(target_rate * duration_s))
    if wanted > len(schedule):
        raise ValueError(f"the trace has {len(schedule)} arrivals, fewer than the {wanted} that {target_rate:g} req/s "
                         f"over {duration_s:g} s needs; lower --rate or --duration")
    offsets = np.asarray(schedule.offsets, dtype=float) * (duration_s / schedule.span_s)
    offsets = np.minimum(offsets, np.nextafter(duration_s, 0))  # the last arrival stays inside the window
    keep = np.sort(np.random.default_rng(seed).choice(len(offsets), size=wanted, replace=False))
    ids = tuple(schedule.prompt_ids[i] for i in keep) if schedule.prompt_ids is not None else None
    return Schedule(tuple(offsets[keep].tolist()), ids)


def make_schedule(kind: str, *, rate: float | None = None, duration_s: float | None = None,
                  count: int | None = None, burst_size: int | None = None, burst_interval_s: float | None = None,
                  num_bursts: int | None = None, trace: str | Path | None = None, seed: int = 0) -> Schedule:
    """Build a schedule from command-line style options; ``kind`` is poisson, constant, bursts or trace."""
    if kind == "poisson":
        return poisson_arrivals(_required(rate, "rate", kind), duration_s=duration_s, count=count, seed=seed)
    if kind == "constant":
        return constant_arrivals(_required(rate, "rate", kind), duration_s=duration_s, count=count)
    if kind == "bursts":
        return burst_arrivals(_required(burst_size, "burst_size", kind), _required(burst_interval_s,
                              "burst_interval_s", kind), _required(num_bursts, "num_bursts", kind))
    if kind == "trace":
        loaded = load_trace(_required(trace, "trace", kind))
        if rate is not None and duration_s is not None:
            return fit_trace(loaded, target_rate=rate, duration_s=duration_s, seed=seed)
        return rescale(loaded, target_rate=rate, duration_s=duration_s)
    raise ValueError(f"unknown arrival process {kind!r}; choose poisson, constant, bursts or trace")


def _required(value, name: str, kind: str):
    if value is None:
        raise ValueError(f"the {kind} arrival process needs {name}")
    return value
