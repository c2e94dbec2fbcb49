"""ClusterBackend: the server's Backend over model replicas, with retries when a replica dies.

The ingress runs the same FastAPI app as ``glideserve serve`` (``create_app``) over this backend.
Each engine request is one call to a replica of its model (``ReplicaPool.open``); the call streams
the replica's engine events. The ingress owns each request's id, its image URLs and its call, so
cancellation (``abort``) cancels the call on the replica that holds it, and a replica that dies or
hangs (sends nothing, not even a heartbeat, for ``hang_timeout_s``) has the request retried on
another replica from the start, with the same resolved parameters (the same seed: the same image),
at most ``max_attempts`` times in all. A request ends with exactly one GenerationResult or
RequestFailed; progress from an abandoned attempt is not repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from glideserve.engine.async_engine import EngineStats
from glideserve.errors import EngineStoppedError, GlideServeError, InvalidRequestError, ModelLoadError
from glideserve.outputs import EngineEvent, GenerationResult, RequestFailed, StepProgress
from glideserve.params import GenerationParams

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 1.0


class ReplicaLostError(Exception):
    """The replica holding a call died, was removed, or broke the call's stream."""


@dataclass(frozen=True)
class Admitted:
    """First item of every replica call: the replica admitted the request with these resolved params."""

    request_id: str
    params: GenerationParams
    replica: str


@dataclass(frozen=True)
class Refused:
    """The only item of a call the replica refused: the GlideServeError to answer with (a normal outcome,
    so it travels as data rather than as a failed call)."""

    error: GlideServeError


@dataclass(frozen=True)
class Heartbeat:
    """Sent by a replica while a request waits or runs and its engine is making progress."""

    replica: str


@dataclass
class StepRecord:
    """One engine step of some replica, replayed to the ingress's step listeners (metrics)."""

    duration_s: float
    num_requests: int
    num_rows: int
    model: str = ""


@dataclass
class ReplicaSnapshot:
    """What a replica last reported: its model, process, engine stats and model card."""

    replica: str
    model: str
    pid: int
    node: str
    stats: dict
    card: dict
    reported_at: float = field(default_factory=time.time)


class ReplicaCall(Protocol):
    """One request on one replica: Admitted (or Refused), then Heartbeat and engine events. Raises
    ReplicaLostError when the replica goes away."""

    def __aiter__(self) -> AsyncIterator[object]: ...

    def cancel(self) -> None: ...


class ReplicaPool(Protocol):
    """The replicas of every model: opens calls, describes models, reports replicas' state."""

    def open(self, model: str, params: GenerationParams, request_id: str) -> ReplicaCall: ...

    async def describe(self, model: str) -> dict: ...

    async def snapshots(self) -> list[ReplicaSnapshot]: ...

    async def steps(self) -> list[StepRecord]: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How long a silent replica may hold a request, and how many attempts a request gets (per model)."""

    hang_timeout_s: float
    max_attempts: dict[str, int]


class ClusterStream:
    """One engine request across attempts; iterate for its events (see the module docstring)."""

    def __init__(self, backend: "ClusterBackend", model: str, request_id: str, params: GenerationParams,
                 call: ReplicaCall, first: AsyncIterator[object], replica: str):
        self.backend = backend
        self.model = model
        self.request_id = request_id
        self.params = params
        self.replica = replica
        self.attempts = 1
        self._call = call
        self._items = first
        self._cancelled = False
        self._arrival = time.monotonic()
        self._last_step = 0

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        try:
            while True:
                try:
                    async for event in self._attempt():
                        if isinstance(event, (GenerationResult, RequestFailed)):
                            yield self._finish(event)
                            return
                        yield event
                    raise ReplicaLostError("the replica ended the call without an answer")
                except (ReplicaLostError, TimeoutError) as exc:
                    self._call.cancel()
                    if self._cancelled:
                        yield self._finish(RequestFailed(self.request_id, "aborted", "cancelled"))
                        return
                    failed = await self._retry(exc)
                    if failed is not None:
                        yield self._finish(failed)
                        return
        finally:
            self._finish(None)

    def _finish(self, event: EngineEvent | None) -> EngineEvent | None:
        """Unregister at the answer (a reader may stop there, as the warm-up does) and end the call."""
        self.backend._streams.pop(self.request_id, None)
        self._call.cancel()
        return event

    async def _attempt(self) -> AsyncIterator[EngineEvent]:
        timeout = self.backend.retry.hang_timeout_s
        iterator = self._items.__aiter__()
        while True:
            pending = asyncio.ensure_future(iterator.__anext__())
            try:
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if not done:
                    raise TimeoutError(f"replica {self.replica} sent nothing for {timeout:.0f} s")
                item = pending.result()
            except StopAsyncIteration:
                return
            except (ReplicaLostError, asyncio.CancelledError):
                if self._cancelled:  # our own cancel() ended the call
                    yield RequestFailed(self.request_id, "aborted", "cancelled")
                    return
                raise
            finally:
                _discard(pending)
            if isinstance(item, Heartbeat):
                continue
            if isinstance(item, StepProgress):  # an attempt after a retry starts over: no repeated progress
                if item.step <= self._last_step:
                    continue
                self._last_step = item.step
            yield item

    async def _retry(self, cause: Exception) -> RequestFailed | None:
        """Re-open the request on another replica; a RequestFailed when it cannot be."""
        limit = self.backend.retry.max_attempts.get(self.model, 2)
        self.backend.counts["replica_failures"] += 1
        while self.attempts < limit:
            self.attempts += 1
            self.backend.counts["retries"] += 1
            log.warning("request %s lost on replica %s (%s); retry %d of %d", self.request_id, self.replica, cause,
                        self.attempts - 1, limit - 1)
            try:
                self._call, self._items, self.replica = await self.backend._open(self.model, self._retry_params(),
                                                                                 self.request_id)
                return None
            except GlideServeError as exc:
                return RequestFailed(self.request_id, exc.code, exc.message, error=exc)
            except (ReplicaLostError, TimeoutError) as exc:
                cause = exc
        return RequestFailed(self.request_id, "error", f"the request was lost with its replica {limit} time(s) "
                             f"(last: {cause}); retry it")

    def _retry_params(self) -> GenerationParams:
        if self.params.slo_ms is None:
            return self.params
        elapsed_ms = (time.monotonic() - self._arrival) * 1000.0
        return dataclasses.replace(self.params, slo_ms=max(1.0, self.params.slo_ms - elapsed_ms))


def _discard(task: asyncio.Future) -> None:
    """Cancel a read still pending and retrieve its outcome, so that no error goes unreported."""
    if not task.done():
        task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


class ClusterBackend:
    """A server Backend whose models run on cluster replicas (see the module docstring).

    ``models`` are the served model names, the default first. ``stats()`` sums the replicas'
    latest reports; step listeners receive the replicas' steps as they are reported (about once a
    second), so ``/metrics`` of the ingress covers every replica. LoRA uploads are not routed
    (each replica reads its model's ``lora_dir``).
    """

    def __init__(self, pool: ReplicaPool, models: list[str], retry: RetryPolicy,
                 poll_interval_s: float = POLL_INTERVAL_S):
        if not models:
            raise ValueError("a cluster serves at least one model")
        self.pool = pool
        self.names = list(models)
        self.retry = retry
        self.counts = {"replica_failures": 0, "retries": 0}
        self.poll_interval_s = poll_interval_s
        self._descriptions: dict[str, dict] = {}
        self._snapshots: list[ReplicaSnapshot] = []
        self._streams: dict[str, ClusterStream] = {}
        self._listeners: list[Callable[[object], None]] = []
        self._accepting = True
        self._poller: asyncio.Task | None = None

    @property
    def spec(self):
        return self.spec_of(self.names[0])

    def spec_of(self, model: str):
        description = self._descriptions.get(model)
        if description is None:
            raise EngineStoppedError(f"model {model} has no replica ready yet; retry in a few seconds")
        return description["spec"]

    def description(self, model: str) -> dict | None:
        """What a replica of ``model`` said about it at start (spec, card, latency profile)."""
        return self._descriptions.get(model)

    async def start(self) -> None:
        for name in self.names:
            self._descriptions[name] = await self.pool.describe(name)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _open(self, model: str, params: GenerationParams, request_id: str):
        call = self.pool.open(model, params, request_id)
        items = call.__aiter__()
        try:
            first = await asyncio.wait_for(items.__anext__(), self.retry.hang_timeout_s)
        except StopAsyncIteration:
            call.cancel()
            raise ReplicaLostError("the replica closed the call before admitting the request") from None
        except asyncio.TimeoutError:
            call.cancel()
            raise TimeoutError(f"no replica of {model} admitted the request within "
                               f"{self.retry.hang_timeout_s:.0f} s") from None
        except BaseException:
            call.cancel()
            raise
        if isinstance(first, Refused):
            call.cancel()
            raise first.error
        if not isinstance(first, Admitted):
            call.cancel()
            raise ReplicaLostError(f"the replica answered {type(first).__name__} before admitting the request")
        return call, items, first.replica

    async def add_request(self, params: GenerationParams, request_id: str | None = None) -> ClusterStream:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        model = params.model if params.model is not None else self.names[0]
        if model not in self.names:
            raise ModelLoadError(f"model {model!r} is not served here; choose one of "
                                 f"{', '.join(map(repr, self.names))}", "model")
        rid = request_id or params.request_id or f"req-{uuid.uuid4().hex[:12]}"
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
        params = dataclasses.replace(params, model=model)
        attempts, limit = 0, self.retry.max_attempts.get(model, 2)
        while True:
            attempts += 1
            try:
                call, items, replica = await self._open(model, params, rid)
                break
            except (ReplicaLostError, TimeoutError) as exc:
                self.counts["replica_failures"] += 1
                if attempts >= limit:
                    raise EngineStoppedError(f"no replica of {model} could take the request ({exc}); retry "
                                             "in a few seconds") from None
                self.counts["retries"] += 1
        stream = ClusterStream(self, model, rid, params, call, items, replica)
        stream.attempts = attempts
        self._streams[rid] = stream
        return stream

    async def abort(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream.cancel()
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                self._snapshots = await self.pool.snapshots()
                for step in await self.pool.steps():
                    for listener in self._listeners:
                        listener(step)
            except Exception as exc:  # metrics only: a failed poll must not stop serving
                log.warning("could not read the replicas' reports: %s", exc)

    def replicas(self) -> list[ReplicaSnapshot]:
        """The replicas' latest reports (refreshed about once a second)."""
        return list(self._snapshots)

    def stats(self) -> EngineStats:
        total = EngineStats(0, 0, 0, 0.0, 0, 0)
        latest = None
        for snapshot in self._snapshots:
            stats = snapshot.stats
            for name in ("num_waiting", "num_running", "steps_total", "num_paused", "refused_total",
                         "dropped_total", "preempted_total", "resumed_total"):
                setattr(total, name, getattr(total, name) + int(stats.get(name, 0)))
            if latest is None or snapshot.reported_at > latest.reported_at:
                latest = snapshot
        if latest is not None:
            total.last_step_s = float(latest.stats.get("last_step_s", 0.0))
            total.last_batch_rows = int(latest.stats.get("last_batch_rows", 0))
            total.last_batch_requests = int(latest.stats.get("last_batch_requests", 0))
        return total

    def add_step_listener(self, fn: Callable[[object], None]) -> None:
        self._listeners.append(fn)

    def model_cards(self) -> list[dict]:
        replicas: dict[str, int] = {}
        for snapshot in self._snapshots:
            replicas[snapshot.model] = replicas.get(snapshot.model, 0) + 1
        cards = []
        for name in self.names:
            card = dict((self._descriptions.get(name) or {}).get("card") or {"name": name, "loaded": False})
            card.update(name=name, replicas=replicas.get(name, 0))
            cards.append(card)
        return cards

    def loras(self, model: str | None = None) -> list[dict]:
        return list((self._descriptions.get(model or self.names[0]) or {}).get("loras") or [])

    def add_lora(self, name: str, data: bytes, model: str | None = None) -> dict:
        raise InvalidRequestError("a cluster does not take LoRA uploads; put the adapter in the model's lora_dir "
                                  "on every node", "lora")

    def delete_lora(self, name: str, model: str | None = None) -> None:
        self.add_lora(name, b"", model)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop admitting; with ``drain`` wait for every admitted request's answer, else cancel them."""
        self._accepting = False
        if not drain:
            for stream in list(self._streams.values()):
                stream.cancel()
        while self._streams:
            await asyncio.sleep(0.05)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
