"""Deadline-aware replica choice for Ray Serve's request router.

Each model replica reports (``record_routing_stats``) its engine's waiting and running requests, the
last step's duration and whether it still admits requests. A request goes to the replica predicted
to start it soonest: requests ahead of it (the router's own live count when it has one, else the
replica's report) times that replica's step time. Replicas that stopped admitting (draining) rank
last. Ray Serve then sends the request to the first replica of the first rank that has room
(``max_ongoing_requests``), backing off when none has, and drops replicas that died.
"""

from __future__ import annotations

import math
import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

DEFAULT_STEP_S = 0.05  # a replica that has not stepped yet: only its queue length counts


def predicted_wait_s(stats: dict, ongoing: int | None) -> float:
    """How long a new request would wait on a replica, from its routing stats (inf: not admitting)."""
    if stats.get("accepting") is False:
        return math.inf
    queued = ongoing if ongoing is not None else int(stats.get("waiting", 0)) + int(stats.get("running", 0))
    step_s = float(stats.get("step_s") or DEFAULT_STEP_S)
    return queued * step_s


def rank(replicas: list, ongoing: dict, stats_of=lambda r: r.routing_stats or {}) -> list[list]:
    """Replicas best first by predicted wait (ties at random), as Ray's ranks: the best alone, then the rest."""
    shuffled = list(replicas)
    random.shuffle(shuffled)
    ordered = sorted(shuffled, key=lambda r: predicted_wait_s(stats_of(r), ongoing.get(r.replica_id)))
    return [ordered[:1], ordered[1:]] if len(ordered) > 1 else [ordered]


class DeadlineAwareRouter(FIFOMixin, RequestRouter):
    """Routes each request to the replica predicted to start it soonest (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        ongoing = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        return rank(candidate_replicas, ongoing)
