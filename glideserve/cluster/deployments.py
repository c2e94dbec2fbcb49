"""Ray Serve deployments: one per model (each replica runs a glideserve engine) and the ingress.

The ingress serves ``create_app(ClusterBackend(...))``: the same FastAPI app, schemas, errors,
streaming and metrics as ``glideserve serve``. With a cascade, the ingress wraps the cluster backend
in the same CascadeBackend as one machine does, and the allocator's plans set replica counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque

import ray
from ray import serve

from glideserve.cluster import registry
from glideserve.cluster.backend import Admitted, Heartbeat, Refused, ReplicaSnapshot, StepRecord
from glideserve.cluster.config import ModelDeployment
from glideserve.errors import GlideServeError
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.params import GenerationParams

log = logging.getLogger(__name__)
REPORT_INTERVAL_S = 1.0


class ModelReplica:
    """One replica of one model: a glideserve AsyncEngine, its calls streamed to the ingress.

    ``generate`` yields Admitted (or Refused, with the GlideServeError that refused the request), then
    Heartbeat while the engine makes progress and the request's engine events; a cancelled call
    aborts the engine request (freed at the next step). ``check_health`` fails when the engine
    loop died or has work and took no step for ``hang_timeout_s`` (Ray Serve then replaces the
    replica). Every ``REPORT_INTERVAL_S`` the replica reports its state to the registry.
    """

    async def __init__(self, model: dict, app_name: str, hang_timeout_s: float):
        import torch

        from glideserve.cli.serve import System, make_backend

        self.model = ModelDeployment.model_validate(model)
        self.hang_timeout_s = hang_timeout_s
        self.heartbeat_s = max(0.5, min(5.0, hang_timeout_s / 4))
        torch.set_num_threads(max(1, int(self.model.resources.num_cpus)))
        engine = self.model.engine
        self.engine = make_backend(System.glideserve, f"{self.model.name}={self.model.source}",
                                   max_batch_rows=engine.max_batch_rows, max_waiting=engine.max_queue,
                                   device=engine.device, dtype=engine.dtype, policy=engine.policy,
                                   default_cache=engine.cache, profile=engine.profile, compile=engine.compile,
                                   compile_buckets=tuple(engine.compile_buckets), attention=engine.attention,
                                   quantize=engine.quantize, gpu_memory_fraction=engine.gpu_memory_fraction)
        await self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._steps: deque[StepRecord] = deque(maxlen=10_000)
        self.engine.add_step_listener(self._on_step)
        self._progress_at = time.monotonic()
        self._steps_seen = 0
        self._registry = ray.get_actor(registry.registry_name(app_name), namespace=registry.NAMESPACE)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    def _on_step(self, step) -> None:  # engine thread
        self._steps.append(StepRecord(step.duration_s, step.num_requests, step.num_rows, self.model.name))

    def _progressing(self) -> bool:
        """Whether the engine is idle or has taken a step within ``hang_timeout_s``."""
        stats = self.engine.stats()
        now = time.monotonic()
        if stats.num_waiting + stats.num_running == 0 or stats.steps_total != self._steps_seen:
            self._progress_at, self._steps_seen = now, stats.steps_total
        return now - self._progress_at < self.hang_timeout_s

    async def generate(self, params: GenerationParams, request_id: str):
        try:
            stream = await self.engine.add_request(params, request_id)
        except GlideServeError as exc:
            yield Refused(exc)
            return
        yield Admitted(stream.request_id, stream.params, self.replica)
        events = stream.__aiter__()
        finished = False
        try:
            while not finished:
                next_event = asyncio.ensure_future(events.__anext__())
                try:
                    while not (await asyncio.wait({next_event}, timeout=self.heartbeat_s))[0]:
                        if self._progressing():  # a stuck engine sends nothing: the ingress gives up on it
                            yield Heartbeat(self.replica)
                    event = next_event.result()
                except StopAsyncIteration:
                    return
                finally:
                    next_event.cancel()
                finished = isinstance(event, (GenerationResult, RequestFailed))
                yield event
        finally:
            if not finished:  # cancelled by the ingress, or the call broke: free the engine's slot
                await self.engine.abort(stream.request_id)

    async def describe(self) -> dict:
        """What the ingress needs about this model: spec, model card, LoRAs, batch latency profile."""
        from glideserve.cascade.serving import model_profile

        slot = self.engine.models.get(self.model.name)
        try:
            profile = model_profile(slot)
        except Exception as exc:  # no measured profile (profile: false): the allocator then waits for one
            log.info("no latency profile for %s yet: %s", self.model.name, exc)
            profile = None
        cards = self.engine.model_cards()
        return {"spec": slot.spec, "card": cards[0] if cards else {"name": self.model.name},
                "loras": self.engine.loras(self.model.name), "profile": profile, "replica": self.replica}

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats()
        return {"waiting": stats.num_waiting, "running": stats.num_running,
                "step_s": stats.last_step_s, "accepting": self.engine.accepting}

    def check_health(self) -> None:
        if self._loop_failed() or not self._progressing():
            raise RuntimeError(f"replica {self.replica} of {self.model.name}: the engine is stuck or stopped")

    def _loop_failed(self) -> bool:
        loop = getattr(self.engine, "_loop", None)
        return loop is not None and loop.done()

    def _snapshot(self) -> ReplicaSnapshot:
        stats = self.engine.stats()
        cards = self.engine.model_cards()
        return ReplicaSnapshot(self.replica, self.model.name, os.getpid(), socket.gethostname(),
                               dict(stats.__dict__), cards[0] if cards else {})

    async def _report_loop(self) -> None:
        while True:
            steps = [self._steps.popleft() for _ in range(len(self._steps))]
            try:
                await self._registry.report.remote(self._snapshot(), steps)
            except Exception as exc:  # the registry restarts; keep serving
                log.warning("could not report to the registry: %s", exc)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self):
        with contextlib.suppress(Exception):
            await self.engine.shutdown(drain=True)
