"""Latency profile: what a step, a prefill and a decode cost, as the scheduler predicts them.

The scheduler sees only this object, never a tensor. It is filled by a start-up sweep
(see ``glideserve.runner.profiler``), persisted as JSON, and updated online from every
real step with an exponentially weighted moving average, so it follows the machine.

Costs are keyed by ``tokens_per_row`` (latent tokens of one batch row at an image
size): a denoising forward of ``rows`` rows at one size costs ``group_s(tokens, rows)``;
a step that runs several sizes runs one forward per size, so its cost is the sum.
A size that was never measured is estimated from the nearest measured one at the same
number of latent tokens (``rows * tokens / tokens_ref`` rows), until it is observed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

PROFILE_FORMAT = 2  # 2: points are the fastest of the repeats (1: the median)
# Online updates: an observation moves its whole curve by ``alpha`` of the relative error
# (the machine's speed) and its own point by SHAPE_SHARE x ``alpha`` (the curve's shape,
# which the start-up sweep measured well). One observation moves a curve by at most
# MAX_DRIFT_RATIO, so that one stalled step cannot rescale a whole table.
SHAPE_SHARE = 0.25
MAX_DRIFT_RATIO = 4.0


class PiecewiseLinear:
    """Seconds as a function of a count (rows, images, prompts), through measured points.

    Between points it interpolates linearly; below the first point it keeps the first
    value (a fixed per-call cost dominates small batches); past the last it extends the
    last segment's slope (proportionally when there is one point or a falling slope).
    Two physical bounds keep a point that another process slowed down (interference
    only ever adds time) from misleading the scheduler: predictions never fall as the
    count grows (a point above a later one is read as the later one), and never grow
    faster than the count (``n`` items cost at most ``n / m`` times what ``m < n`` cost,
    since batching amortises, never adds, per-call work).
    ``observe`` moves the point at ``x`` towards a measurement (inserting it first).
    """

    def __init__(self, points: dict[int, float] | None = None):
        self.points: dict[int, float] = dict(sorted((points or {}).items()))

    def __bool__(self) -> bool:
        return bool(self.points)

    def __call__(self, x: float) -> float:
        if not self.points:
            return 0.0
        value = self._interpolate(x)
        for p, y in self.points.items():
            if p >= x:
                value = min(value, y)
            elif p > 0:
                value = min(value, y * x / p)
        return value

    def _interpolate(self, x: float) -> float:
        xs = list(self.points)
        if x <= xs[0]:
            return self.points[xs[0]]
        for lo, hi in zip(xs, xs[1:]):
            if x <= hi:
                y_lo, y_hi = self.points[lo], self.points[hi]
                return y_lo + (y_hi - y_lo) * (x - lo) / (hi - lo)
        last = xs[-1]
        y_last = self.points[last]
        if len(xs) > 1:
            prev = xs[-2]
            slope = (y_last - self.points[prev]) / (last - prev)
            if slope > 0:
                return y_last + slope * (x - last)
        return y_last * x / last

    def observe(self, x: int, seconds: float, alpha: float, drift: float = 0.0) -> None:
        """Move towards a measurement at ``x``: the whole curve by ``drift`` of the error
        (relative to the prediction), then the point at ``x`` by ``alpha``.

        The whole-curve part is why a machine that slows down (other work on its cores)
        is followed at every count, not only at the counts it happens to run: with the
        bounds of ``__call__``, a stale fast point would otherwise cap the prediction of
        every count above it.
        """
        if drift and self.points:
            predicted = self(x)
            if predicted > 0:
                ratio = min(max(seconds / predicted, 1 / MAX_DRIFT_RATIO), MAX_DRIFT_RATIO)
                self.points = {p: y * (1 + drift * (ratio - 1)) for p, y in self.points.items()}
        if x not in self.points:
            self.points[x] = self._interpolate(x) if self.points else seconds
            self.points = dict(sorted(self.points.items()))
        self.points[x] += alpha * (seconds - self.points[x])

    def scaled(self, factor: float) -> "PiecewiseLinear":
        return PiecewiseLinear({x: y * factor for x, y in self.points.items()})

    def to_json(self) -> dict[str, float]:
        return {str(x): round(y, 7) for x, y in self.points.items()}

    @classmethod
    def from_json(cls, data: dict) -> "PiecewiseLinear":
        return cls({int(x): float(y) for x, y in data.items()})


@dataclass
class LatencyProfile:
    """Predicted seconds of denoising forwards, prefills and decodes; updated online.

    ``steps[tokens]`` maps rows to the seconds of one forward group (forward plus the
    per-request sampler updates); ``decode[tokens]`` maps images to the seconds of one
    batched VAE decode; ``prefill`` maps new requests to the seconds of their batched
    prefill; ``overhead_s`` is what a step costs besides those (scheduling, bookkeeping),
    learned online only. ``cached_row_share`` is what a row taking a cached step costs
    as a fraction of a full row (learned online from groups that mixed both; a first
    guess until then). ``alpha`` is the EWMA weight of each new observation (see
    SHAPE_SHARE for how it splits between a curve's level and its shape). An empty
    profile predicts 0 s (it learns from the first real steps).
    """

    steps: dict[int, PiecewiseLinear] = field(default_factory=dict)
    decode: dict[int, PiecewiseLinear] = field(default_factory=dict)
    prefill: PiecewiseLinear = field(default_factory=PiecewiseLinear)
    alpha: float = 0.1
    overhead_s: float = 0.0
    cached_row_share: float = 0.1

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")

    # -- predictions ---------------------------------------------------------------
    def group_s(self, tokens_per_row: int, rows: int) -> float:
        """One forward of ``rows`` rows at an image size with ``tokens_per_row`` latent tokens."""
        return _lookup(self.steps, tokens_per_row, rows)

    def step_s(self, groups: Iterable[tuple[int, int]]) -> float:
        """A step that runs one forward per ``(tokens_per_row, rows)`` group, with its overhead."""
        forwards = [self.group_s(tokens, rows) for tokens, rows in groups if rows]
        return sum(forwards) + self.overhead_s if forwards else 0.0

    def prefill_s(self, requests: int) -> float:
        return self.prefill(requests) if requests else 0.0

    def decode_s(self, tokens_per_row: int, images: int) -> float:
        return _lookup(self.decode, tokens_per_row, images) if images else 0.0

    @property
    def measured(self) -> bool:
        return bool(self.steps)

    # -- online updates ----------------------------------------------------------------
    def observe_group(self, tokens_per_row: int, rows: int, seconds: float) -> None:
        _observe(self.steps, tokens_per_row, rows, seconds, self.alpha)

    def observe_prefill(self, requests: int, seconds: float) -> None:
        if requests:
            _follow(self.prefill, requests, seconds, self.alpha)

    def observe_decode(self, tokens_per_row: int, images: int, seconds: float) -> None:
        if images:
            _observe(self.decode, tokens_per_row, images, seconds, self.alpha)

    def observe_cached_group(self, tokens_per_row: int, rows: int, cached_rows: int, seconds: float) -> None:
        """A forward in which ``cached_rows`` of ``rows`` took cached steps: learn their cost share."""
        full = rows - cached_rows
        base = self.group_s(tokens_per_row, full) if full else 0.0
        marginal = self.group_s(tokens_per_row, rows) - base
        if marginal > 0:
            share = min(1.0, max(0.0, (seconds - base) / marginal))
            self.cached_row_share += self.alpha * (share - self.cached_row_share)

    def observe_overhead(self, seconds: float) -> None:
        self.overhead_s += self.alpha * (max(0.0, seconds) - self.overhead_s)

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT,
                "steps": {str(t): f.to_json() for t, f in self.steps.items()},
                "decode": {str(t): f.to_json() for t, f in self.decode.items()},
                "prefill": self.prefill.to_json()}

    @classmethod
    def from_json(cls, data: dict, alpha: float = 0.1) -> "LatencyProfile":
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"unsupported latency profile format {data.get('format')!r}")
        return cls({int(t): PiecewiseLinear.from_json(f) for t, f in data["steps"].items()},
                   {int(t): PiecewiseLinear.from_json(f) for t, f in data["decode"].items()},
                   PiecewiseLinear.from_json(data["prefill"]), alpha)

    def merge(self, other: "LatencyProfile") -> None:
        """Take ``other``'s tables for the sizes it has (the prefill table if this has none)."""
        self.steps.update(other.steps)
        self.decode.update(other.decode)
        if other.prefill and not self.prefill:
            self.prefill = other.prefill

    def table(self) -> list[dict]:
        """Rows for display: one per (size, rows) point measured."""
        out = []
        for tokens, curve in sorted(self.steps.items()):
            for rows, seconds in curve.points.items():
                out.append({"tokens_per_row": tokens, "rows": rows, "step_ms": seconds * 1e3,
                            "ms_per_row": seconds * 1e3 / rows})
        return out


def _nearest(tables: dict[int, PiecewiseLinear], tokens: int) -> int | None:
    known = [t for t, f in tables.items() if f]
    return min(known, key=lambda t: (abs(t - tokens), t)) if known else None


def _lookup(tables: dict[int, PiecewiseLinear], tokens: int, count: int) -> float:
    curve = tables.get(tokens)
    if curve:
        return curve(count)
    ref = _nearest(tables, tokens)
    if ref is None:
        return 0.0
    return tables[ref](count * tokens / ref)


def _observe(tables: dict[int, PiecewiseLinear], tokens: int, count: int, seconds: float, alpha: float) -> None:
    curve = tables.get(tokens)
    if not curve:
        ref = _nearest(tables, tokens)
        if ref is None:
            tables[tokens] = PiecewiseLinear({count: seconds})
            return
        # First sight of this size: borrow the nearest size's shape, calibrated to this measurement.
        seeded = PiecewiseLinear({c: _lookup(tables, tokens, c) for c in tables[ref].points})
        estimate = seeded(count)
        tables[tokens] = seeded.scaled(seconds / estimate) if estimate > 0 else PiecewiseLinear({count: seconds})
        return
    _follow(curve, count, seconds, alpha)


def _follow(curve: PiecewiseLinear, count: int, seconds: float, alpha: float) -> None:
    """The online update of every table: the level by ``alpha``, the shape by SHAPE_SHARE of it."""
    curve.observe(count, seconds, alpha * SHAPE_SHARE, drift=alpha)
