"""Latency and escalation profiles a cascade is sized from.

One JSON schema serves both DiffServe's published A100 profiles and the ones
``glideserve cascade profile`` measures on this machine::

    {"batch_sizes": [1, 2, 4, ...],
     "latency_ms": {"<model>": [ms per batch of each size, or null], ...},
     "escalated_fraction_at_threshold": {"<cascade>": {"<t>": f(t), ...}, ...},
     "slo_s": {"<cascade or light_heavy>": seconds, ...},
     "quality": {"<model>": {"<metric>": value}, ...}}      # optional

f(t) is the share of queries whose discriminator confidence is below the threshold t,
i.e. the share a cascade at threshold t sends on to the heavy model.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelProfile:
    """Seconds one batch of each profiled size takes on one worker (sizes ascending, no gaps in meaning:
    a batch of n runs at the smallest profiled size >= n)."""

    name: str
    batch_sizes: tuple[int, ...]
    latency_s: tuple[float, ...]

    def __post_init__(self):
        if not self.batch_sizes or len(self.batch_sizes) != len(self.latency_s):
            raise ValueError(f"{self.name}: need one latency per batch size, got {self.batch_sizes} / "
                             f"{self.latency_s}")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"{self.name}: batch sizes must be positive and ascending, got {self.batch_sizes}")
        if any(not (x > 0 and math.isfinite(x)) for x in self.latency_s):
            raise ValueError(f"{self.name}: latencies must be positive, got {self.latency_s}")

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def latency(self, n: int) -> float:
        """Seconds for a batch of ``n`` queries (``1 <= n <= max_batch``)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"{self.name}: batch of {n} is outside the profile (1..{self.max_batch})")
        return self.latency_s[bisect.bisect_left(self.batch_sizes, n)]

    def throughput(self, index: int) -> float:
        """Queries per second of one worker running full batches of ``batch_sizes[index]``."""
        return self.batch_sizes[index] / self.latency_s[index]


@dataclass(frozen=True)
class EscalationProfile:
    """f(t): the share of queries a threshold ``t`` escalates, as measured points, interpolated linearly
    between them with f(0) = 0 and f(1) = 1 (a confidence is a probability)."""

    thresholds: tuple[float, ...]
    fractions: tuple[float, ...]

    def __post_init__(self):
        if len(self.thresholds) != len(self.fractions) or not self.thresholds:
            raise ValueError("need one escalated fraction per threshold")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds) or any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise ValueError("thresholds and fractions must lie in [0, 1]")
        if list(self.thresholds) != sorted(set(self.thresholds)):
            raise ValueError("thresholds must be ascending and distinct")
        if any(b < a for a, b in zip(self.fractions, self.fractions[1:])):
            raise ValueError("f(t) must not decrease as t grows")

    @classmethod
    def from_table(cls, table: dict) -> "EscalationProfile":
        """f(t) from a ``{"t": f(t)}`` table, as profiles files and discriminator reports store it."""
        points = sorted((float(t), float(f)) for t, f in table.items())
        return cls(tuple(t for t, _ in points), tuple(f for _, f in points))

    @classmethod
    def from_scores(cls, confidences, points: int = 201) -> "EscalationProfile":
        """f(t) measured from discriminator confidences, at ``points`` thresholds evenly spaced in [0, 1] and
        at ``points`` quantiles of the scores (a discriminator sure of most light images puts them all
        within 0.01 of 0: the quantiles keep that range as finely measured as the rest)."""
        scores = np.sort(np.asarray(confidences, dtype=np.float64))
        if scores.size == 0:
            raise ValueError("need at least one confidence score to measure f(t)")
        grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, points),
                                         np.quantile(scores, np.linspace(0.0, 1.0, points))]))
        fractions = np.searchsorted(scores, grid, side="left") / scores.size  # share strictly below t
        return cls(tuple(float(t) for t in grid), tuple(float(f) for f in fractions))

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        t, f = list(self.thresholds), list(self.fractions)
        if t[0] > 0.0:
            t, f = [0.0] + t, [0.0] + f
        if t[-1] < 1.0:
            t, f = t + [1.0], f + [1.0]
        return np.asarray(t), np.asarray(f)

    def __call__(self, threshold: float) -> float:
        t, f = self._points()
        return float(np.interp(threshold, t, f))

    def grid(self, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
        """Thresholds for the allocator and f at each: ``points`` evenly spaced in [0, 1] (DiffServe's
        201-value grid) and the ``points`` thresholds that escalate 0, 1/(points-1), ..., 1 of the queries,
        so a choice between escalation shares is as fine wherever the confidences crowd."""
        even = np.linspace(0.0, 1.0, points)
        by_share = [self.confidence_at(q) for q in even]
        thresholds = np.unique(np.concatenate([even, by_share]))
        return thresholds, np.array([self(t) for t in thresholds])

    def confidence_at(self, quantile: float) -> float:
        """The confidence below which ``quantile`` of the queries fall (f's inverse), for sampling scores."""
        t, f = self._points()
        return float(np.interp(quantile, f, t))

    def as_dict(self) -> dict[str, float]:
        return {f"{t:.6g}": f for t, f in zip(self.thresholds, self.fractions)}


@dataclass(frozen=True)
class CascadeProfile:
    """Everything the allocator and the simulator know about one light/heavy pair."""

    light: ModelProfile
    heavy: ModelProfile
    escalation: EscalationProfile
    slo_s: float
    quality: dict[str, dict[str, float]] = field(default_factory=dict)


def _model(raw: dict, name: str) -> ModelProfile:
    latencies = raw["latency_ms"].get(name)
    if latencies is None:
        raise ValueError(f"no latency profile for {name!r}; the file has {', '.join(raw['latency_ms'])}")
    pairs = [(b, ms / 1000.0) for b, ms in zip(raw["batch_sizes"], latencies) if ms is not None]
    return ModelProfile(name, tuple(b for b, _ in pairs), tuple(s for _, s in pairs))


def load_profiles(path: Path, light: str, heavy: str, cascade: str | None = None,
                  slo_s: float | None = None) -> CascadeProfile:
    """The pair ``light``/``heavy`` from a profiles file; ``cascade`` names its f(t) table (default: the
    light model's name) and ``slo_s`` overrides the file's SLO."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read profiles {path}: {exc}") from exc
    tables = {k: v for k, v in raw.get("escalated_fraction_at_threshold", {}).items() if k != "note"}
    key = cascade or light
    if key not in tables:
        raise ValueError(f"no f(t) table {key!r} in {path}; choose one of {', '.join(tables) or 'none'}")
    escalation = EscalationProfile.from_table(tables[key])
    if slo_s is None:
        slos = raw.get("slo_s", {})
        candidates = [v for k, v in slos.items() if k.startswith(key) or k == f"{light}_{heavy}"]
        if not candidates:
            raise ValueError(f"no SLO for {key!r} in {path}; pass one")
        slo_s = float(candidates[0])
    return CascadeProfile(_model(raw, light), _model(raw, heavy), escalation, float(slo_s),
                          raw.get("quality", {}))
