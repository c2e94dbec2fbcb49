"""Scheduling policies: the order in which requests get batch slots, as a plug-in.

The scheduler does the bookkeeping (budget, joining, preemption, drops); a policy
only says who comes first and whether deadlines are enforced. ``create_policy(name)``
returns one of:

- ``fcfs``: first come, first served; deadline-blind (no refusals, drops, holds or
  preemption), the engine's behaviour before deadlines existed.
- ``edf``: earliest deadline first, with deadline-aware admission, joining, drops and
  preemption.
- ``slack``: least slack first (slack = deadline - now - predicted remaining time),
  otherwise as ``edf``. A request with many steps left is started before one with few
  steps and the same deadline, because it has less room to wait.

Under ``edf`` and ``slack`` requests with a deadline come before best-effort ones; a
best-effort request that has waited too long gets an ``aged_deadline`` from the
scheduler (after every deadline already promised), so a steady stream of deadline
requests cannot starve it. ``priority`` (higher first) orders best-effort requests
and breaks ties.
"""

from __future__ import annotations

from typing import Protocol

from glideserve.request import Request


class SchedulingPolicy(Protocol):
    """Orders requests; ``deadline_aware`` turns on refusals, drops, join holds and preemption."""

    name: str
    deadline_aware: bool

    def key(self, request: Request, now: float, step_s: float) -> tuple:
        """Sort key: smaller runs first. ``step_s`` is the predicted seconds of one step now."""
        ...


class FCFSPolicy:
    """First come, first served; priority breaks ties between simultaneous arrivals."""

    name = "fcfs"
    deadline_aware = False

    def key(self, request: Request, now: float, step_s: float) -> tuple:
        return (request.arrival_time, -request.priority)


class EDFPolicy:
    """Earliest deadline first; best effort after, ordered by priority then arrival."""

    name = "edf"
    deadline_aware = True

    def urgency(self, request: Request, deadline: float, now: float, step_s: float) -> float:
        return deadline

    def key(self, request: Request, now: float, step_s: float) -> tuple:
        deadline = request.effective_deadline
        if deadline is None:
            return (1, 0.0, -request.priority, request.arrival_time)
        return (0, self.urgency(request, deadline, now, step_s), -request.priority, request.arrival_time)


class SlackPolicy(EDFPolicy):
    """Least slack first: deadline minus now minus the predicted time of the remaining steps."""

    name = "slack"

    def urgency(self, request: Request, deadline: float, now: float, step_s: float) -> float:
        return deadline - now - request.remaining_steps * step_s


POLICIES: dict[str, type] = {"fcfs": FCFSPolicy, "edf": EDFPolicy, "slack": SlackPolicy}
POLICY_NAMES = tuple(POLICIES)


def create_policy(name: str) -> SchedulingPolicy:
    """The policy called ``name`` (one of ``POLICY_NAMES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return POLICIES[name]()
