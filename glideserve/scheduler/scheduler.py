"""Iteration-level scheduler: decides, at every denoising step, which requests run.

It owns the waiting queue and the running set and never touches a tensor. Each
``schedule()`` call keeps every running request that still has steps to do (they
were admitted because they fit), then admits waiting requests in FIFO order while
the step budget (batch rows, latent tokens) allows; the first request that does not
fit stops admission so later arrivals cannot overtake it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from glideserve.config import SchedulerConfig
from glideserve.errors import InvalidRequestError, QueueFullError
from glideserve.outputs import EngineEvent, GenerationResult, Queued, RequestFailed, RequestTimings, StepProgress
from glideserve.request import Request, RequestStatus
from glideserve.scheduler.output import NewRequestData, RunnerOutput, SchedulerOutput


class Scheduler:
    """FCFS step-level scheduler under a per-step budget; see the module docstring."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}  # insertion order = admission order
        self._to_free: list[str] = []
        self._pending_events: list[EngineEvent] = []

    # -- admission ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self._running or any(r.request_id == request.request_id for r in self._waiting):
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", "request_id")
        if request.rows > self.config.max_batch_rows or request.cost_tokens > self.config.max_latent_tokens:
            raise InvalidRequestError(
                f"this request needs {request.rows} rows and {request.cost_tokens} latent tokens per step, more than "
                f"the engine's budget ({self.config.max_batch_rows} rows, {self.config.max_latent_tokens} tokens); "
                "use a smaller size or raise max_latent_tokens", "size")
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests); retry shortly")
        request.status = RequestStatus.WAITING
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Cancel a request. A running one is freed from the runner at the next step."""
        for req in self._waiting:
            if req.request_id == request_id:
                self._waiting.remove(req)
                break
        else:
            req = self._running.pop(request_id, None)
            if req is None:
                return False
            self._to_free.append(request_id)
        req.status = RequestStatus.ABORTED
        self._pending_events.append(RequestFailed(request_id, "aborted", "the request was cancelled"))
        return True

    # -- the step ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        rows = tokens = 0
        scheduled: list[str] = []
        for req in self._running.values():
            if not req.denoising_done:  # a finished one is only waiting for its decode
                scheduled.append(req.request_id)
                rows += req.rows
                tokens += req.cost_tokens
        new: list[NewRequestData] = []
        while self._waiting:
            req = self._waiting[0]
            if rows + req.rows > self.config.max_batch_rows or tokens + req.cost_tokens > self.config.max_latent_tokens:
                break
            self._waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.queue_position = None
            self._running[req.request_id] = req
            new.append(NewRequestData(req.request_id, req.params))
            scheduled.append(req.request_id)
            rows += req.rows
            tokens += req.cost_tokens
        freed, self._to_free = tuple(self._to_free), []
        return SchedulerOutput(tuple(new), tuple(scheduled), freed, rows, tokens)

    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[EngineEvent]:
        """Apply a runner result; return the events for callers, in order."""
        events, self._pending_events = self._pending_events, []
        now = self.clock()
        for rid in result.stepped:
            req = self._running.get(rid)
            if req is None:
                continue
            req.steps_done += 1
            req.first_step_time = req.first_step_time or now
            req.last_step_time = now
            events.append(StepProgress(rid, req.steps_done, req.num_steps, result.previews.get(rid)))
        for rid, (image, decode_s) in result.finished.items():
            req = self._running.pop(rid, None)
            if req is None:
                continue
            if not req.denoising_done:
                raise RuntimeError(f"runner finished {rid} after {req.steps_done}/{req.num_steps} steps")
            req.status = RequestStatus.FINISHED
            events.append(GenerationResult(rid, image, req.params, self._timings(req, now, decode_s)))
        for rid, message in result.failed.items():
            req = self._running.pop(rid, None)
            if req is not None:
                req.status = RequestStatus.FAILED
                events.append(RequestFailed(rid, "error", message))
        for position, req in enumerate(self._waiting):
            if req.queue_position != position:
                req.queue_position = position
                events.append(Queued(req.request_id, position))
        return events

    def _timings(self, req: Request, now: float, decode_s: float) -> RequestTimings:
        first = req.first_step_time or now
        return RequestTimings(queued_s=first - req.arrival_time, denoise_s=(req.last_step_time or now) - first,
                              decode_s=decode_s, total_s=now - req.arrival_time, steps=req.steps_done)

    # -- introspection -------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._to_free or self._pending_events)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)
