"""Step-caching policies: what a request may reuse from earlier steps, parsed from one string.

A policy is chosen per server (``--cache``) and may be overridden per request
(``GenerationParams.cache``). Every row of a mixed batch follows its own request's
policy and statistics; no decision is pooled over the batch.

- ``none``: every step runs every block (exact).
- ``glideserve:N``: GlideServe's block-output cache. A full step stores the image
  stream's output of the last block and resets the request's counter to N; a cached
  step skips every block and feeds the stored output through the final adaLN layer
  modulated by the new timestep. Alone, full steps fall at 0, N+1, 2(N+1), ...
- ``fora:N``: FORA. A full step stores every block's attention and MLP outputs; the
  next N steps reuse them, recomputing only each block's timestep modulation.
- ``teacache:T``: TeaCache. Skip the blocks (adding the stored residual of the block
  stack to the new input) while the accumulated relative L1 change of the
  timestep-modulated input since the last full step stays under T.
- ``fbcache:T``: First-Block-Cache. Run the first block; reuse the stored residual of
  the others while the first block's residual changed by less than T (relative L1)
  since the last full step.
- ``taylorseer:N``: like ``glideserve:N`` but the skipped output is forecast from the
  last two full steps by a first-order Taylor expansion in the step index.
- ``deepcache:N``: DeepCache for UNets: a full step stores the input of the
  outermost up block; the next N steps run only the outermost down and up blocks.
- ``adaptive``: the scheduler decides every step which requests compute fully:
  all of them while the latency profile says every deadline holds (exact at low
  load); under load just enough cached steps to keep deadlines, never more than the
  quality floor allows, given to the requests whose inputs changed least since their
  last full step (TeaCache's indicator, measured per request). A cached step reuses
  the last block's output as ``glideserve:N`` does.

Counter policies (``glideserve``, ``fora``, ``taylorseer``, ``deepcache``) are decided
by the scheduler, which may also spend full-step slots (progressive batching);
threshold policies (``teacache``, ``fbcache``) are decided by the runner from the
row's own statistics, unless the scheduler forces a full step.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from glideserve.errors import InvalidRequestError

COUNTER_POLICIES = ("glideserve", "fora", "taylorseer", "deepcache")
THRESHOLD_POLICIES = ("teacache", "fbcache")
ADAPTIVE = "adaptive"
POLICY_KINDS = ("none", *COUNTER_POLICIES, *THRESHOLD_POLICIES, ADAPTIVE)
AUTO_CACHE = "auto"  # an engine default only: the model family's own default policy
MAX_INTERVAL = 50
MAX_THRESHOLD = 10.0
_DECIMAL = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?|\.[0-9]{1,6}")


class StepKind(enum.Enum):
    """How one request's rows take one denoising step."""

    FULL = "full"  # every block runs
    CACHED = "cached"  # the policy reuses stored features
    AUTO = "auto"  # the runner decides from the row's own statistics (threshold policies)


@dataclass(frozen=True)
class CachePolicy:
    """A parsed policy: ``kind`` with its ``interval`` (counter policies) or ``threshold``."""

    kind: str = "none"
    interval: int = 0
    threshold: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def scheduler_decides(self) -> bool:
        return self.kind in COUNTER_POLICIES or self.kind == ADAPTIVE

    @property
    def is_adaptive(self) -> bool:
        return self.kind == ADAPTIVE

    def full_fraction(self) -> float | None:
        """Fraction of steps that run every block, when the policy fixes it (counter policies)."""
        if self.kind in COUNTER_POLICIES:
            return 1.0 / (self.interval + 1)
        return 1.0 if self.kind == "none" else None

    def __str__(self) -> str:
        if self.kind in COUNTER_POLICIES:
            return f"{self.kind}:{self.interval}"
        if self.kind in THRESHOLD_POLICIES:  # at most 6 decimals were accepted: this round-trips exactly
            return f"{self.kind}:{self.threshold:.6f}".rstrip("0").rstrip(".")
        return self.kind


NO_CACHE = CachePolicy()


def parse_cache_policy(text: object, field: str = "cache") -> CachePolicy:
    """Parse ``none``, ``adaptive``, ``glideserve:N``, ``fora:N``, ``taylorseer:N``, ``deepcache:N`` (N in
    1..50), ``teacache:T`` or ``fbcache:T`` (T in (0, 10]); raise InvalidRequestError otherwise."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{field} must be a string such as 'none' or 'glideserve:5'", field)
    kind, sep, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind not in POLICY_KINDS:
        raise InvalidRequestError(f"unknown cache policy {text!r}; choose one of none, adaptive, glideserve:N, "
                                  "fora:N, taylorseer:N, deepcache:N, teacache:T, fbcache:T", field)
    if kind in ("none", ADAPTIVE):
        if sep:
            raise InvalidRequestError(f"cache policy {kind!r} takes no parameter", field)
        return NO_CACHE if kind == "none" else CachePolicy(ADAPTIVE)
    if kind in COUNTER_POLICIES:
        if not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= MAX_INTERVAL:
            raise InvalidRequestError(f"{kind} needs an interval in 1..{MAX_INTERVAL}, as in '{kind}:5'; "
                                      f"got {text!r}", field)
        return CachePolicy(kind, interval=int(arg))
    threshold = float(arg) if _DECIMAL.fullmatch(arg) else math.nan
    if not 0 < threshold <= MAX_THRESHOLD:
        raise InvalidRequestError(f"{kind} needs a threshold in (0, {MAX_THRESHOLD:g}] with at most 6 decimals, "
                                  f"as in '{kind}:0.1'; got {text!r}", field)
    return CachePolicy(kind, threshold=threshold)
