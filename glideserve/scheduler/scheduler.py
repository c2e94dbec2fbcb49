"""Iteration-level scheduler: decides, at every denoising step, which requests run.

It owns every admitted ``Request`` (waiting, running, paused, waiting for decode) and
never touches a tensor. Each ``schedule()``:

1. drops requests predicted to miss their deadline by more than the tolerance;
2. orders requests with the policy (``fcfs``, ``edf`` or ``slack``);
3. may pause running requests at this step boundary so that a tighter deadline
   makes it, when the paused ones still make theirs;
4. keeps the running requests and admits waiting (or paused) ones in order while the
   budget allows, holding back a candidate whose joining would make a running request
   late; a request too big for the room left is passed by later ones for at most
   ``max_bypass_steps`` steps;
5. decides which finished requests are decoded now (batched across steps while
   requests wait for capacity) and which waiting prompts are encoded ahead;
6. gives every scheduled request its step kind (full, cached, or the row's own
   cache statistics decide; ``glideserve.scheduler.caching``), having claimed its
   feature cache's memory from the ledger when it was admitted.

``add_request`` refuses at once what the profile says cannot meet its deadline.
Deadline rules apply under the deadline-aware policies only; ``fcfs`` is blind to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from glideserve.cache.policy import StepKind
from glideserve.config import SchedulerConfig
from glideserve.errors import InvalidRequestError, QueueFullError, SLOUnattainableError
from glideserve.outputs import EngineEvent, GenerationResult, Queued, RequestFailed, RequestTimings, StepProgress
from glideserve.request import Request, RequestStatus
from glideserve.scheduler.caching import StepKindPlanner, record_step_kind
from glideserve.scheduler.deadlines import DeadlinePlanner
from glideserve.scheduler.memory import MemoryLedger
from glideserve.scheduler.output import NewRequestData, RunnerOutput, SchedulerOutput
from glideserve.scheduler.policy import create_policy
from glideserve.scheduler.profile import LatencyProfile

DEADLINE_EXCEEDED = "deadline_exceeded"


@dataclass
class SchedulerCounters:
    """Totals since start: refusals at admission, drops, holds, preemptions and resumes."""

    refused: int = 0
    dropped: int = 0
    held_back: int = 0
    preempted: int = 0
    resumed: int = 0


class Scheduler:
    """Step-level scheduler under a per-step budget, with a pluggable policy; see the module docstring."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic,
                 profile: LatencyProfile | None = None):
        self.config = config
        self.clock = clock
        self.profile = profile if profile is not None else LatencyProfile()
        self.policy = create_policy(config.policy)
        self.planner = DeadlinePlanner(self.profile, config)
        self.counters = SchedulerCounters()
        self.memory = MemoryLedger(int(config.cache_memory_mb * 2**20))
        self.step_kinds = StepKindPlanner(config.full_slots, config.min_full_fraction)
        self.full_fraction = 1.0  # the adaptive policy's share of full steps at the last step
        self._waiting: list[Request] = []
        self._running: dict[str, Request] = {}  # denoising, holding batch rows
        self._paused: dict[str, Request] = {}
        self._decoding: dict[str, Request] = {}  # denoised, waiting for their batched decode
        self._to_free: list[str] = []
        self._pending_events: list[EngineEvent] = []

    # -- admission ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if self._find(request.request_id) is not None:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", "request_id")
        if request.rows > self.config.max_batch_rows or request.cost_tokens > self.config.max_latent_tokens:
            raise InvalidRequestError(
                f"this request needs {request.rows} rows and {request.cost_tokens} latent tokens per step, more than "
                f"the engine's budget ({self.config.max_batch_rows} rows, {self.config.max_latent_tokens} tokens); "
                "use a smaller size or raise max_latent_tokens", "size")
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests); retry shortly")
        if self.policy.deadline_aware and request.deadline is not None:
            self._check_attainable(request)
        request.status = RequestStatus.WAITING
        self._waiting.append(request)

    def _check_attainable(self, request: Request) -> None:
        now = self.clock()
        running = self._ordered(self._running.values(), now)
        queue = self._ordered([*self._waiting, *self._paused.values(), request], now)
        verdict = self.planner.admission(now, request, running, queue, set(self._paused))
        first = next(r for r in queue if r.deadline is not None)
        if not verdict.admitted and not verdict.harms_others and first is request \
                and len(self._paused) < self.config.max_paused:
            # Too late by waiting, but as the most urgent it may pause less urgent running requests.
            wait_finish = request.arrival_time + verdict.predicted_latency_s
            if self.planner.victims_for(now, request, running, wait_finish):
                return
        if not verdict.admitted:
            self.counters.refused += 1
            raise SLOUnattainableError(
                f"the request cannot finish within its SLO: {verdict.reason} (predicted latency "
                f"{verdict.predicted_latency_s:.2f} s); retry later, with fewer steps or a longer slo_ms",
                predicted_s=verdict.predicted_latency_s, retry_after_s=max(1.0, verdict.retry_after_s))

    def abort(self, request_id: str) -> bool:
        """Cancel a request. One holding runner state is freed at the next step."""
        req = self._find(request_id)
        if req is None:
            return False
        self._remove(req)
        req.status = RequestStatus.ABORTED
        self._pending_events.append(RequestFailed(request_id, "aborted", "the request was cancelled"))
        return True

    # -- the step ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        deadline_aware = self.policy.deadline_aware
        if deadline_aware:
            self._age_best_effort(now)
        preempted: list[Request] = []
        if deadline_aware and len(self._paused) < self.config.max_paused:
            preempted = self._preempt(now)
        if deadline_aware and self.config.drop_late_after is not None:
            self._drop_late(now)
        running = self._ordered(self._running.values(), now)
        candidates = self._ordered([*self._waiting, *self._paused.values()], now)
        new, resumed = self._admit(now, running, [c for c in candidates if c not in preempted])
        scheduled = [*running, *resumed, *(self._running[d.request_id] for d in new)]
        still_waiting = [c for c in candidates if c.status is not RequestStatus.RUNNING]
        full = sum(r.rows for r in scheduled) + 2 > self.config.max_batch_rows
        decode = self._decode_now(now, scheduled, saturated=bool(still_waiting) or full)
        ahead = self._encode_ahead(still_waiting, self.config.max_prefill_batch - len(new)) if new else ()
        freed, self._to_free = tuple(self._to_free), []
        self.full_fraction = self._full_fraction(now, scheduled, still_waiting)
        return SchedulerOutput(
            new_requests=tuple(new), scheduled=tuple(r.request_id for r in scheduled), freed=freed,
            decode=decode, encode_ahead=ahead, preempted=tuple(r.request_id for r in preempted),
            resumed=tuple(r.request_id for r in resumed),
            step_kinds=self.step_kinds.plan(scheduled, self.full_fraction), num_rows=sum(r.rows for r in scheduled),
            num_tokens=sum(r.cost_tokens for r in scheduled))

    def _admit(self, now: float, members: list[Request], candidates: list[Request]
               ) -> tuple[list[NewRequestData], list[Request]]:
        budget_rows, budget_tokens = self.config.max_batch_rows, self.config.max_latent_tokens
        rows, tokens = sum(r.rows for r in members), sum(r.cost_tokens for r in members)
        members = list(members)
        new: list[NewRequestData] = []
        resumed: list[Request] = []
        blocked: list[Request] = []
        for cand in candidates:
            if self._progressive_batch_full(members, cand):
                continue
            if rows + cand.rows > budget_rows or tokens + cand.cost_tokens > budget_tokens:
                if cand.bypassed_steps >= self.config.max_bypass_steps:
                    break  # later requests have passed it long enough: keep the room for it
                blocked.append(cand)
                continue
            # A request with a deadline was admitted on a plan in which it joins as soon as there is room
            # and every admitted request stays on time; holding it back would break that plan. A
            # best-effort request was promised nothing, so it joins only if no running request turns late.
            if self.policy.deadline_aware and cand.effective_deadline is None \
                    and self.planner.joining_harms(now, members, cand):
                self.counters.held_back += 1
                continue
            members.append(cand)
            rows += cand.rows
            tokens += cand.cost_tokens
            if cand.request_id in self._paused:
                del self._paused[cand.request_id]
                resumed.append(cand)
                self.counters.resumed += 1
            else:
                self._waiting.remove(cand)
                if cand.cache_policy.enabled:
                    cand.cache_granted = self.memory.claim(cand.request_id, cand.cache_bytes)
                new.append(NewRequestData(cand.request_id, cand.params, cand.cache_granted))
            cand.status = RequestStatus.RUNNING
            cand.queue_position = None
            self._running[cand.request_id] = cand
        if new or resumed:
            for b in blocked:
                b.bypassed_steps += 1
        return new, resumed

    def _full_fraction(self, now: float, scheduled: list[Request], waiting: list[Request]) -> float:
        """Share of full steps for ``adaptive`` requests: 1 (exact) unless deadlines need caching;
        deadline-blind policies never cache for load."""
        if not self.policy.deadline_aware or not any(r.cache_policy.is_adaptive for r in scheduled) \
                or all(r.deadline is None for r in (*scheduled, *waiting)):
            return 1.0
        return self.planner.full_fraction(now, scheduled, waiting, set(self._paused))

    def _progressive_batch_full(self, members: list[Request], cand: Request) -> bool:
        """GlideServe's bound with ``full_slots``: at most slots x interval + 1 counter-policy requests run."""
        slots, policy = self.config.full_slots, cand.cache_policy
        if slots is None or not policy.scheduler_decides:
            return False
        return sum(1 for m in members if m.cache_policy.scheduler_decides) >= slots * policy.interval + 1

    def _age_best_effort(self, now: float) -> None:
        """Give best-effort requests that waited ``best_effort_wait_s`` a deadline after every
        deadline already promised: they then run before later arrivals, and break no promise."""
        limit = self.config.best_effort_wait_s
        aging = [r for r in self._waiting if r.deadline is None and r.aged_deadline is None
                 and now - r.arrival_time >= limit]
        if not aging:
            return
        promised = max((r.deadline for r in (*self._running.values(), *self._paused.values(), *self._waiting)
                        if r.deadline is not None), default=now)
        for r in aging:
            r.aged_deadline = max(now, promised)

    def _drop_late(self, now: float) -> None:
        running = self._ordered(self._running.values(), now)
        queue = self._ordered([*self._waiting, *self._paused.values()], now)
        result = self.planner.predict(now, running, queue, set(self._paused), drops=True)
        for rid in result.dropped:
            req = self._find(rid)
            self._remove(req)
            req.status = RequestStatus.DROPPED
            self.counters.dropped += 1
            self._pending_events.append(RequestFailed(
                rid, DEADLINE_EXCEEDED, f"dropped after {now - req.arrival_time:.2f} s: the request was predicted "
                f"to finish more than {self.config.drop_late_after:g} x its SLO past its deadline "
                f"(slo_ms={req.params.slo_ms:g}); retry with a longer slo_ms or when the server is less busy"))

    def _preempt(self, now: float) -> list[Request]:
        """Pause running requests for the most urgent waiting one with a deadline, when it pays."""
        running = self._ordered(self._running.values(), now)
        candidates = self._ordered([*self._waiting, *self._paused.values()], now)
        head = next((i for i, c in enumerate(candidates) if c.deadline is not None), None)
        if head is None or not running:
            return []
        waits = self.planner.predict(now, running, candidates[:head + 1], set(self._paused))
        victims = self.planner.victims_for(now, candidates[head], running,
                                           waits.finish.get(candidates[head].request_id))
        for v in victims or ():
            del self._running[v.request_id]
            self._paused[v.request_id] = v
            v.status = RequestStatus.PAUSED
            v.preemptions += 1
            self.counters.preempted += 1
        return victims or []

    def _decode_now(self, now: float, scheduled: list[Request], saturated: bool) -> tuple[str, ...]:
        """Denoised requests to decode at the end of this step: those deferred earlier plus those
        whose last step runs now, batched; deferred only while the engine is saturated (requests
        wait or the batch is full), where saving VAE calls buys capacity; otherwise it only adds latency."""
        finishing = [r for r in scheduled if r.remaining_steps == 1]
        ready = sorted(self._decoding.values(), key=lambda r: r.denoised_time or 0.0) + finishing
        if not ready:
            return ()
        stepping = len(finishing) < len(scheduled)
        if stepping and saturated and not self.planner.must_decode(now, self.planner.step_s(scheduled), ready):
            return ()
        return tuple(r.request_id for r in ready[:self.config.max_decode_batch])

    def _encode_ahead(self, waiting: list[Request], budget: int) -> tuple[str, ...]:
        texts: list[str] = []
        for r in waiting:
            if budget <= 0:
                break
            if r.prefetched or r.request_id in self._paused:
                continue
            r.prefetched = True
            budget -= 1
            texts.append(r.params.prompt)
            if r.params.uses_cfg:
                texts.append(r.params.negative_prompt or "")
        return tuple(dict.fromkeys(texts))

    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[EngineEvent]:
        """Apply a runner result; return the events for callers, in order."""
        events, self._pending_events = self._pending_events, []
        now = self.clock()
        for rid in self._decoding:
            if rid not in plan.decode:
                self._decoding[rid].decode_waits += 1
        for rid in result.stepped:
            req = self._running.get(rid)
            if req is None:
                continue
            record_step_kind(req, result.step_kinds.get(rid, StepKind.FULL), result.cache_change.get(rid))
            req.steps_done += 1
            req.first_step_time = req.first_step_time or now
            req.last_step_time = now
            events.append(StepProgress(rid, req.steps_done, req.num_steps, result.previews.get(rid)))
            if req.denoising_done:  # decoded at the end of this step, or later with others
                self.memory.release(rid)  # the runner dropped its feature cache with its last step
                del self._running[rid]
                req.denoised_time = now
                self._decoding[rid] = req
        for rid, finished in result.finished.items():
            req = self._decoding.pop(rid, None)
            if req is None:
                continue
            req.status = RequestStatus.FINISHED
            events.append(GenerationResult(rid, finished.image, req.params, self._timings(req, now, finished.decode_s)))
        for rid, message in result.failed.items():
            req = self._find(rid)
            if req is not None:
                self._remove(req, free=False)
                req.status = RequestStatus.FAILED
                events.append(RequestFailed(rid, "error", message))
        for position, req in enumerate(self._ordered(self._waiting, now)):
            if req.queue_position != position:
                req.queue_position = position
                events.append(Queued(req.request_id, position))
        self._observe(result)
        return events

    def observe_step(self, duration_s: float, result: RunnerOutput) -> None:
        """Wall time from one busy step's start to the next's: what its stages do not explain is overhead."""
        if result.timing.groups:
            self.profile.observe_overhead(duration_s - result.timing.total_s)

    def _observe(self, result: RunnerOutput) -> None:
        timing = result.timing
        for group in timing.groups:
            # The profile models full steps; a group with cached rows is cheaper than its row count says,
            # and learning from it would make full-step predictions optimistic.
            if group.cached_rows == 0:
                self.profile.observe_group(group.tokens_per_row, group.rows, group.seconds)
            else:
                self.profile.observe_cached_group(group.tokens_per_row, group.rows, group.cached_rows, group.seconds)
        for decode in timing.decodes:
            self.profile.observe_decode(decode.tokens_per_row, decode.images, decode.seconds)
        self.profile.observe_prefill(timing.prefill_requests, timing.prefill_s)

    def _timings(self, req: Request, now: float, decode_s: float) -> RequestTimings:
        first = req.first_step_time or now
        return RequestTimings(queued_s=first - req.arrival_time, denoise_s=(req.last_step_time or now) - first,
                              decode_s=decode_s, total_s=now - req.arrival_time, steps=req.steps_done,
                              full_steps=req.full_steps, cached_steps=req.cached_steps)

    # -- bookkeeping -------------------------------------------------------------------
    def _ordered(self, requests, now: float) -> list[Request]:
        requests = list(requests)
        if len(requests) < 2:
            return requests
        # Slack needs the time of a step; with nothing running, that of one request alone.
        step_s = self.planner.step_s(self._running.values()) or self.planner.step_s(requests[:1])
        return sorted(requests, key=lambda r: self.policy.key(r, now, step_s))

    def _find(self, request_id: str) -> Request | None:
        for table in (self._running, self._paused, self._decoding):
            if request_id in table:
                return table[request_id]
        return next((r for r in self._waiting if r.request_id == request_id), None)

    def _remove(self, req: Request, free: bool = True) -> None:
        """Forget ``req``; with ``free``, release its runner state at the next step if it has any."""
        self.memory.release(req.request_id)
        for table in (self._running, self._paused, self._decoding):
            if table.pop(req.request_id, None) is not None:
                if free:
                    self._to_free.append(req.request_id)
                return
        self._waiting.remove(req)

    # -- introspection -------------------------------------------------------------
    def least_slack_s(self, now: float, keep_margin: bool = False) -> float | None:
        """The smallest slack (deadline - now - predicted remaining steps) of the requests with a
        deadline, or None when none has one; what another model's steps must not eat into. With
        ``keep_margin`` the admission margin (that share of each SLO, kept for prediction error) is
        not counted as slack: what work outside inference (fine-tuning) may use."""
        requests = [r for r in (*self._running.values(), *self._paused.values(), *self._waiting)
                    if r.deadline is not None]
        if not requests:
            return None
        step_s = self.planner.step_s(self._running.values()) or self.planner.step_s(requests[:1])
        margin = self.config.admission_margin if keep_margin else 0.0
        return min(r.deadline - now - r.remaining_steps * step_s - margin * r.slo_s for r in requests)

    def has_best_effort(self) -> bool:
        """Whether a request without a deadline is waiting, paused or running."""
        return any(r.deadline is None for r in (*self._running.values(), *self._paused.values(), *self._waiting))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._paused or self._decoding or self._to_free
                    or self._pending_events)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._decoding)

    @property
    def num_paused(self) -> int:
        return len(self._paused)
