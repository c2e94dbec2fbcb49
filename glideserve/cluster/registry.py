"""The replicas' reports: one small Ray actor every replica tells its load and steps to.

Ray Serve routes a handle call to *some* replica; the ingress cannot ask each one in turn. So each
replica pushes a ReplicaSnapshot (engine stats, process id, model card) and its new steps about once a
second to this named actor, and the ingress reads them for ``/metrics``, ``/v1/stats`` and the
allocator. A replica silent for ``stale_after_s`` is left out (it died or hangs).
"""

from __future__ import annotations

import time
from collections import deque

import ray

from glideserve.cluster.backend import ReplicaSnapshot, StepRecord

MAX_STEP_RECORDS = 20_000


NAMESPACE = "glideserve"


def registry_name(app_name: str) -> str:
    return f"glideserve-registry-{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class ReplicaRegistry:
    """Latest snapshot per replica and a bounded log of steps, read by the ingress."""

    def __init__(self, stale_after_s: float = 5.0):
        self.stale_after_s = stale_after_s
        self._snapshots: dict[str, ReplicaSnapshot] = {}
        self._steps: deque[tuple[int, StepRecord]] = deque(maxlen=MAX_STEP_RECORDS)
        self._seq = 0

    def report(self, snapshot: ReplicaSnapshot, steps: list[StepRecord]) -> None:
        snapshot.reported_at = time.time()
        self._snapshots[snapshot.replica] = snapshot
        for step in steps:
            self._seq += 1
            self._steps.append((self._seq, step))

    def forget(self, replica: str) -> None:
        self._snapshots.pop(replica, None)

    def snapshots(self) -> list[ReplicaSnapshot]:
        now = time.time()
        for replica in [r for r, s in self._snapshots.items() if now - s.reported_at > self.stale_after_s * 20]:
            del self._snapshots[replica]  # long gone: do not keep dead replicas forever
        return [s for s in self._snapshots.values() if now - s.reported_at <= self.stale_after_s]

    def steps_since(self, seq: int) -> tuple[int, list[StepRecord]]:
        """Steps after ``seq`` (a cursor from the previous call; 0 at first) and the new cursor."""
        return self._seq, [step for n, step in self._steps if n > seq]


def get_or_create(app_name: str):
    """The app's registry actor. Detached: it must outlive any one replica (a replica that created it
    could be the one that dies); ``glideserve cluster down`` kills it with the app."""
    return ReplicaRegistry.options(name=registry_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                                   lifetime="detached").remote()


def kill(app_name: str) -> None:
    try:
        ray.kill(ray.get_actor(registry_name(app_name), namespace=NAMESPACE))
    except ValueError:  # never created, or already gone
        pass
