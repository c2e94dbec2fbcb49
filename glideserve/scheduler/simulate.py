"""Step-by-step prediction of when requests finish, from the latency profile.

The scheduler asks "if the engine ran these requests in this order, when would each
one's image be ready?" to refuse requests at admission, to hold back a candidate that
would make a running request late, and to drop requests that cannot be served in time.
The simulation follows the engine's own rules: the running requests step together,
waiting ones join in order while the per-step budget allows, a step costs one forward
per image size, prefill is paid when requests join and decode when they finish. It
advances from one completion to the next (the batch does not change in between), so
it costs O(requests x batch) and needs no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from glideserve.scheduler.profile import LatencyProfile

# Predictions are sums of floats: a finish this close to a deadline or drop point counts as on time.
TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class SimEntry:
    """One request as the simulation sees it.

    ``running`` entries hold a batch slot now; the others join in the order given.
    ``prefilled`` entries (running or paused) pay no prefill when they join.
    ``drop_after``: if the entry's predicted finish, when it would start, is later than
    this, the simulation drops it (it takes no capacity) and reports it. ``deadline``
    is protected from ``holds`` entries: those (best-effort requests) join only if no
    running entry with a deadline turns late, as the scheduler's own rule says.
    ``cost_share`` is the fraction of a full row's step cost its rows pay on average
    (below 1 for requests that take cached steps); the budget still counts whole rows.
    """

    request_id: str
    rows: int
    tokens_per_row: int
    remaining: int
    running: bool = False
    prefilled: bool = False
    drop_after: float | None = None
    deadline: float | None = None
    holds: bool = False
    cost_share: float = 1.0

    @property
    def cost_tokens(self) -> int:
        return self.rows * self.tokens_per_row

    @property
    def step_rows(self) -> float:
        """Rows as the step time sees them: whole rows scaled by the cost share."""
        return self.rows * self.cost_share


@dataclass
class SimResult:
    """Predicted finish time (image ready) per request id, and the ids the simulation dropped."""

    finish: dict[str, float]
    dropped: list[str]


def joining_harms(t: float, members: list[tuple[SimEntry, int]], candidate: SimEntry,
                  profile: LatencyProfile) -> bool:
    """Would ``candidate`` joining ``members`` (entries with their steps left) at time ``t``
    turn a member with a deadline late? Myopic: the batch is taken as it is now."""
    groups = _groups(members)
    current = profile.step_s(groups.items())
    groups[candidate.tokens_per_row] = groups.get(candidate.tokens_per_row, 0) + candidate.step_rows
    trial = profile.step_s(groups.items())
    for e, left in members:
        if e.deadline is not None:
            end = t + profile.decode_s(e.tokens_per_row, 1)
            if end + left * current <= e.deadline + TOLERANCE_S < end + left * trial:
                return True
    return False


def _groups(active) -> dict[int, float]:
    groups: dict[int, float] = {}
    for entry, _ in active:
        groups[entry.tokens_per_row] = groups.get(entry.tokens_per_row, 0) + entry.step_rows
    return groups


def simulate(now: float, entries: list[SimEntry], profile: LatencyProfile, max_rows: int,
             max_tokens: int) -> SimResult:
    """Predict finish times for ``entries`` (running ones first, then the rest in join order)."""
    result = SimResult({}, [])
    active: list[list] = []  # [entry, steps remaining]
    rows = tokens = 0
    waiting: deque[SimEntry] = deque()
    for e in entries:
        if e.running:
            active.append([e, e.remaining])
            rows += e.rows
            tokens += e.cost_tokens
        else:
            waiting.append(e)
    t = now
    # Running entries already predicted past their drop point leave before anything else is planned.
    if any(e.drop_after is not None for e, _ in active):
        step = profile.step_s(_groups(active).items())
        for item in list(active):
            e = item[0]
            if e.drop_after is not None and t + e.remaining * step + profile.decode_s(e.tokens_per_row, 1) \
                    > e.drop_after + TOLERANCE_S:
                active.remove(item)
                rows -= e.rows
                tokens -= e.cost_tokens
                result.dropped.append(e.request_id)
    while active or waiting:
        joined = 0
        skipped: list[SimEntry] = []
        while waiting and rows < max_rows and tokens < max_tokens:
            e = waiting.popleft()
            if rows + e.rows > max_rows or tokens + e.cost_tokens > max_tokens \
                    or e.holds and joining_harms(t, active, e, profile):
                skipped.append(e)
                continue
            if e.drop_after is not None:
                trial = _groups(active)
                trial[e.tokens_per_row] = trial.get(e.tokens_per_row, 0) + e.step_rows
                start = t + profile.prefill_s(joined + (not e.prefilled))
                if start + e.remaining * profile.step_s(trial.items()) \
                        + profile.decode_s(e.tokens_per_row, 1) > e.drop_after + TOLERANCE_S:
                    result.dropped.append(e.request_id)
                    continue
            active.append([e, e.remaining])
            rows += e.rows
            tokens += e.cost_tokens
            joined += not e.prefilled
        waiting.extendleft(reversed(skipped))
        if not active:  # nothing left can ever fit (admission rejects such requests)
            break
        t += profile.prefill_s(joined)
        k = min(item[1] for item in active)
        t += k * profile.step_s(_groups(active).items())
        finishing: dict[int, list[SimEntry]] = {}
        still = []
        for item in active:
            item[1] -= k
            if item[1] <= 0:
                finishing.setdefault(item[0].tokens_per_row, []).append(item[0])
                rows -= item[0].rows
                tokens -= item[0].cost_tokens
            else:
                still.append(item)
        active = still
        for tokens_per_row, done in finishing.items():
            t += profile.decode_s(tokens_per_row, len(done))
            for e in done:
                result.finish[e.request_id] = t
    return result
