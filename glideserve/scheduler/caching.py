"""Per-request step kinds: which scheduled requests take a full step and which reuse their cache.

Counter policies (GlideServe's cache, FORA, TaylorSeer, DeepCache) are decided here:
a request takes a full step at its first step and whenever its counter has run out;
a full step resets the counter to the policy's interval and each cached step
decrements it. With ``full_slots`` (progressive batching) at most that many caching
requests take a full step per step, in GlideServe's priority: requests at their first
step, then those whose counter ran out longest ago; the rest keep reusing their cache
(their counters go negative while they wait). Threshold policies (TeaCache,
First-Block-Cache) are left to the runner (``AUTO``) after their first step.
"""

from __future__ import annotations

from glideserve.cache.policy import StepKind
from glideserve.request import Request


def plan_step_kinds(scheduled: list[Request], full_slots: int | None) -> dict[str, StepKind]:
    """The step kind of every scheduled request, by id."""
    kinds: dict[str, StepKind] = {}
    wanting: list[Request] = []
    for r in scheduled:
        policy = r.cache_policy
        if not policy.enabled or not r.cache_granted:
            kinds[r.request_id] = StepKind.FULL
        elif r.steps_done == 0 or (policy.scheduler_decides and r.cache_counter <= 0):
            wanting.append(r)
        else:
            kinds[r.request_id] = StepKind.CACHED if policy.scheduler_decides else StepKind.AUTO
    wanting.sort(key=lambda r: (r.steps_done > 0, r.cache_counter))
    for n, r in enumerate(wanting):
        over = full_slots is not None and n >= full_slots and r.steps_done > 0
        kinds[r.request_id] = StepKind.CACHED if over else StepKind.FULL
    return kinds


def record_step_kind(request: Request, kind: StepKind) -> None:
    """Count the kind a request's step took and move its counter."""
    if kind is StepKind.CACHED:
        request.cached_steps += 1
        request.cache_counter -= 1
    else:
        request.full_steps += 1
        request.cache_counter = request.cache_policy.interval
