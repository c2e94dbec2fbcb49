"""ClusterBackend against fake replicas (no Ray): retries with the same params, hangs, cancellation,
exactly one answer per request, and stats and steps summed over replicas."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from glideserve.cluster.backend import (Admitted, ClusterBackend, Heartbeat, Refused, ReplicaLostError,
                                        ReplicaSnapshot, RetryPolicy, StepRecord)
from glideserve.errors import EngineStoppedError, ModelLoadError, QueueFullError
from glideserve.outputs import GenerationResult, RequestFailed, StepProgress
from glideserve.params import GenerationParams


class FakeCall:
    def __init__(self, replica: "FakeReplica", params: GenerationParams, request_id: str):
        self.replica, self.params, self.request_id = replica, params, request_id
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self):
        replica = self.replica
        if replica.refuse is not None:
            yield Refused(replica.refuse)
            return
        if replica.dead:
            raise ReplicaLostError(f"{replica.name} is dead")
        yield Admitted(self.request_id, self.params, replica.name)
        for step in range(1, replica.steps + 1):
            if self.cancelled.is_set():
                raise ReplicaLostError("RequestCancelledError")
            if replica.dead or (replica.die_at_step is not None and step == replica.die_at_step):
                replica.dead = True
                raise ReplicaLostError(f"{replica.name} died")
            if replica.hang_at_step == step:
                await self.cancelled.wait()  # silent until the ingress gives up
                raise ReplicaLostError("RequestCancelledError")
            yield Heartbeat(replica.name)
            yield StepProgress(self.request_id, step, replica.steps)
            await asyncio.sleep(0)
        replica.completed.append((self.request_id, self.params))
        yield GenerationResult(self.request_id, Image.new("RGB", (4, 4)), self.params)


class FakeReplica:
    def __init__(self, name: str, steps: int = 4, die_at_step: int | None = None, hang_at_step: int | None = None):
        self.name, self.steps, self.die_at_step, self.hang_at_step = name, steps, die_at_step, hang_at_step
        self.dead = False
        self.refuse: Exception | None = None
        self.completed: list = []


class FakePool:
    """Round-robin over live replicas (as Ray's router drops dead ones)."""

    def __init__(self, replicas: list[FakeReplica]):
        self.replicas = replicas
        self.opened: list[tuple[str, GenerationParams]] = []
        self._next = 0

    def open(self, model, params, request_id):
        live = [r for r in self.replicas if not r.dead] or self.replicas
        replica = live[self._next % len(live)]
        self._next += 1
        self.opened.append((replica.name, params))
        return FakeCall(replica, params, request_id)

    async def describe(self, model):
        return {"spec": None, "card": {"name": model, "family": "sd3"}, "profile": None}

    async def snapshots(self):
        return [ReplicaSnapshot(r.name, "m", 100 + i, "node", {"num_waiting": 1, "num_running": 2, "steps_total": 10},
                                {"name": "m"}) for i, r in enumerate(self.replicas) if not r.dead]

    async def steps(self):
        return [StepRecord(0.01, 2, 4, "m")]


def _backend(replicas, hang_timeout_s: float = 5.0, attempts: int = 3) -> ClusterBackend:
    return ClusterBackend(FakePool(replicas), ["m"], RetryPolicy(hang_timeout_s, {"m": attempts}),
                          poll_interval_s=0.01)


async def _run(backend: ClusterBackend, params: GenerationParams, request_id: str = "r1") -> list:
    stream = await backend.add_request(params, request_id)
    return [event async for event in stream]


PARAMS = GenerationParams(prompt="a red circle", seed=7, num_inference_steps=4)


def test_a_request_lost_with_its_replica_is_retried_elsewhere_with_the_same_params():
    a, b = FakeReplica("a", die_at_step=3), FakeReplica("b")
    backend = _backend([a, b])
    events = asyncio.run(_run(backend, PARAMS))
    assert isinstance(events[-1], GenerationResult)
    assert [type(e) for e in events].count(GenerationResult) == 1
    assert b.completed == [("r1", backend.pool.opened[0][1])]  # same params, same seed
    assert [name for name, _ in backend.pool.opened] == ["a", "b"]
    # Progress is not repeated: steps 1, 2 from a, then 3, 4 from b.
    assert [e.step for e in events if isinstance(e, StepProgress)] == [1, 2, 3, 4]
    assert backend.counts == {"replica_failures": 1, "retries": 1}
    assert backend._streams == {}


def test_a_silent_replica_counts_as_dead():
    a, b = FakeReplica("a", hang_at_step=2), FakeReplica("b")
    backend = _backend([a, b], hang_timeout_s=0.2)
    events = asyncio.run(_run(backend, PARAMS))
    assert isinstance(events[-1], GenerationResult) and b.completed


def test_attempts_are_bounded_and_the_request_fails_once():
    replicas = [FakeReplica(name, die_at_step=2) for name in "abcd"]
    backend = _backend(replicas, attempts=3)
    events = asyncio.run(_run(backend, PARAMS))
    failures = [e for e in events if isinstance(e, RequestFailed)]
    assert len(failures) == 1 and events[-1] is failures[0] and failures[0].reason == "error"
    assert len(backend.pool.opened) == 3 and "retry it" in failures[0].message


def test_a_refusal_on_retry_answers_with_that_error():
    a, b = FakeReplica("a", die_at_step=2), FakeReplica("b")
    b.refuse = QueueFullError("the queue is full")
    events = asyncio.run(_run(_backend([a, b]), PARAMS))
    assert events[-1].reason == "queue_full" and isinstance(events[-1].error, QueueFullError)


def test_admission_errors_reach_the_caller_before_any_event():
    a = FakeReplica("a")
    a.refuse = QueueFullError("the queue is full")
    with pytest.raises(QueueFullError):
        asyncio.run(_run(_backend([a]), PARAMS))
    with pytest.raises(ModelLoadError):
        asyncio.run(_run(_backend([FakeReplica("a")]), GenerationParams(prompt="x", model="other")))


def test_retry_shortens_the_slo_by_the_time_already_spent():
    a, b = FakeReplica("a", die_at_step=2), FakeReplica("b")
    backend = _backend([a, b])
    asyncio.run(_run(backend, GenerationParams(prompt="x", seed=1, slo_ms=60_000)))
    first, second = (p for _, p in backend.pool.opened)
    assert first.slo_ms == 60_000 and 0 < second.slo_ms <= 60_000 and second.seed == first.seed


def test_abort_cancels_the_call_and_ends_the_stream_once():
    async def scenario():
        backend = _backend([FakeReplica("a", hang_at_step=2)], hang_timeout_s=30)
        stream = await backend.add_request(PARAMS, "r1")
        events = []
        async for event in stream:
            events.append(event)
            if isinstance(event, StepProgress):
                assert await backend.abort("r1")
        return backend, events

    backend, events = asyncio.run(scenario())
    assert events[-1].reason == "aborted" and sum(isinstance(e, RequestFailed) for e in events) == 1
    assert backend._streams == {} and len(backend.pool.opened) == 1  # no retry after a cancel


def test_a_reader_that_stops_at_the_answer_unregisters_it_and_shutdown_drains():
    async def scenario():
        backend = _backend([FakeReplica("a")])
        stream = await backend.add_request(PARAMS, "warmup")
        async for event in stream:
            if isinstance(event, GenerationResult):
                break  # as the server's warm-up does
        await asyncio.wait_for(backend.shutdown(drain=True), 5)
        with pytest.raises(EngineStoppedError):
            await backend.add_request(PARAMS, "late")
        return backend

    assert asyncio.run(scenario())._streams == {}


def test_stats_and_steps_sum_the_replicas_reports():
    async def scenario():
        backend = _backend([FakeReplica("a"), FakeReplica("b")])
        steps = []
        backend.add_step_listener(steps.append)
        await backend.start()
        await asyncio.sleep(0.1)
        stats, cards = backend.stats(), backend.model_cards()
        await backend.shutdown()
        return stats, cards, steps

    stats, cards, steps = asyncio.run(scenario())
    assert (stats.num_waiting, stats.num_running, stats.steps_total) == (2, 4, 20)
    assert cards[0]["replicas"] == 2 and cards[0]["family"] == "sd3"
    assert steps and steps[0].num_rows == 4
