"""A server backend with the real Scheduler and a fake runner: scheduling through HTTP in milliseconds.

Admission, ordering, drops and preemption are the engine's own code; only the model
is replaced by :class:`FakeRunner`, whose modelled step costs advance a ManualClock,
so deadlines are decided on simulated time, deterministically.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Callable

from scheduling_fakes import FakeRunner, ManualClock, tokens_of

from glideserve.config import SchedulerConfig
from glideserve.engine.async_engine import EngineStats
from glideserve.engine.stream import RequestStream
from glideserve.errors import EngineStoppedError
from glideserve.models.spec import ModelSpec
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.params import GenerationParams
from glideserve.request import Request
from glideserve.scheduler.profile import LatencyProfile
from glideserve.scheduler.scheduler import Scheduler

SPEC = ModelSpec(name="fake", family="sd3", latent_channels=4, vae_scale_factor=8, patch_size=1, default_height=32,
                 default_width=32, default_steps=4, default_guidance=5.0, samplers=("euler",),
                 default_sampler="euler", max_prompt_tokens=77)


class SchedulingBackend:
    """The server's Backend interface around ``Scheduler`` + ``FakeRunner`` on an asyncio task.

    ``hold()`` / ``release()`` stop and restart stepping so a test can queue several
    requests before the first step (callable from the test's thread); ``before_step``
    runs before each step (a test advances the clock there to make admitted requests late).
    """

    spec = SPEC

    def __init__(self, profile: LatencyProfile, config: SchedulerConfig,
                 group_s: Callable[[int, int], float], decode_s: float = 0.0):
        self.clock = ManualClock()
        self.scheduler = Scheduler(config, clock=self.clock, profile=profile)
        self.runner = FakeRunner(self.clock, group_s, decode_s)
        self.received: list[GenerationParams] = []
        self.before_step: Callable[[], None] = lambda: None
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._go = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._go.set()
        self._stopping = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.steps_total = 0

    def hold(self) -> None:
        self._call_in_loop(self._go.clear)

    def release(self) -> None:
        self._call_in_loop(self._go.set)
        self._call_in_loop(self._wake.set)

    def _call_in_loop(self, fn) -> None:
        # asyncio events are not thread-safe: setting one from the test's thread would not
        # wake the event loop, so hand the call to the loop.
        if self._event_loop is None:
            fn()
        else:
            self._event_loop.call_soon_threadsafe(fn)

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._loop())

    async def add_request(self, params: GenerationParams, request_id: str | None = None) -> RequestStream:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        resolved = params.resolve(SPEC)
        rid = request_id or f"req-{next(self._ids)}"
        request = Request(rid, resolved, num_steps=resolved.num_inference_steps,
                          rows=2 if resolved.uses_cfg else 1, tokens_per_row=tokens_of(resolved),
                          arrival_time=self.clock())
        self.scheduler.add_request(request)  # raises SLOUnattainableError, as the engine does
        self.received.append(resolved)
        stream = RequestStream(rid, resolved, asyncio.get_running_loop())
        self._streams[rid] = stream
        self._wake.set()
        return stream

    async def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        self._wake.set()
        return found

    async def _loop(self) -> None:
        while True:
            await self._go.wait()
            if not self.scheduler.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            self.before_step()
            plan = self.scheduler.schedule()
            events = self.scheduler.update(plan, self.runner.execute(plan))
            self.steps_total += 1
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is None:
                    continue
                stream.push(event)
                if isinstance(event, (GenerationResult, RequestFailed)):
                    self._streams.pop(event.request_id, None)
            await asyncio.sleep(0)

    def stats(self) -> EngineStats:
        sched, counters = self.scheduler, self.scheduler.counters
        return EngineStats(sched.num_waiting, sched.num_running, self.steps_total, 0.0, 0, 0,
                           num_paused=sched.num_paused, refused_total=counters.refused,
                           dropped_total=counters.dropped, preempted_total=counters.preempted,
                           resumed_total=counters.resumed)

    def add_step_listener(self, fn) -> None:
        pass

    def model_cards(self) -> list[dict]:
        return [{"name": self.spec.name, "loaded": True, "family": self.spec.family}]

    async def shutdown(self, drain: bool = True) -> None:
        self._stopping = True
        self._go.set()
        self._wake.set()
        while drain and self.scheduler.has_unfinished():
            await asyncio.sleep(0.001)
        if self._task is not None:
            self._task.cancel()
