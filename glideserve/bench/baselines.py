"""Baseline serving systems built on the diffusers pipeline call.

- ``diffusers-sequential``: one ``pipeline(...)`` call at a time, FIFO, on a worker
  thread: what a diffusers + web-framework service usually does.
- ``request-batching``: waits up to ``batch_wait_ms`` after the oldest waiting
  request and runs up to ``max_batch_size`` waiting requests with equal parameters
  (steps, guidance, size, sampler, negative-prompt mode) as one pipeline call, one
  generator per request: what request-level batching servers do.

Both serve behind the same API as the engine: ``glideserve serve --system NAME``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from glideserve.bench.pipeline_backend import BaselineConfig, PipelineBackend, PendingRequest
from glideserve.engine.compute_thread import ComputeThread

SEQUENTIAL = "diffusers-sequential"
REQUEST_BATCHING = "request-batching"
BASELINE_SYSTEMS = (SEQUENTIAL, REQUEST_BATCHING)


class SequentialBackend(PipelineBackend):
    """``diffusers-sequential``: one request per pipeline call, first come first served."""

    system = SEQUENTIAL

    def _take_batch(self) -> list[PendingRequest] | None:
        while not self._waiting:
            if self._stop:
                return None
            self._cond.wait()
        return [self._waiting.popleft()]


class RequestBatchingBackend(PipelineBackend):
    """``request-batching``: whole requests with equal parameters batched into one pipeline call.

    The oldest waiting request leads the batch; compatible requests behind it join in
    FIFO order while the batch has room. The batch starts when it is full, when the
    leader has waited ``batch_wait_ms``, or at shutdown.
    """

    system = REQUEST_BATCHING

    def _fits(self, batch: list[PendingRequest], candidate: PendingRequest) -> bool:
        if self.config.max_batch_size is not None and len(batch) >= self.config.max_batch_size:
            return False
        return sum(p.rows for p in batch) + candidate.rows <= self.config.max_batch_rows

    def _compatible(self) -> list[PendingRequest]:
        leader = self._waiting[0]
        batch = [leader]
        for pending in itertools.islice(self._waiting, 1, None):
            if pending.batch_key == leader.batch_key:
                if not self._fits(batch, pending):
                    break
                batch.append(pending)
        return batch

    def _full(self, batch: list[PendingRequest]) -> bool:
        if self.config.max_batch_size is not None and len(batch) >= self.config.max_batch_size:
            return True
        return sum(p.rows for p in batch) + batch[0].rows > self.config.max_batch_rows

    def _take_batch(self) -> list[PendingRequest] | None:
        while True:
            while not self._waiting:
                if self._stop:
                    return None
                self._cond.wait()
            batch = self._compatible()
            remaining = self._waiting[0].arrival + self.config.batch_wait_ms / 1000.0 - time.monotonic()
            if self._full(batch) or remaining <= 0 or self._stop:
                for pending in batch:
                    self._waiting.remove(pending)
                return batch
            self._cond.wait(remaining)


def make_backend(system: str, model: str, **config) -> PipelineBackend:
    """Load ``model`` (bundled name, folder or checkpoint) into the baseline named ``system``."""
    from glideserve.models.loading import load_pipeline, serving_defaults, spec_from_pipeline

    classes = {SEQUENTIAL: SequentialBackend, REQUEST_BATCHING: RequestBatchingBackend}
    if system not in classes:
        raise ValueError(f"unknown baseline {system!r}; choose one of {', '.join(BASELINE_SYSTEMS)}")
    options = BaselineConfig.from_kwargs(**config)
    defaults = serving_defaults(model)
    if "max_sequence_length" in defaults and "max_sequence_length" not in config:
        options = dataclasses.replace(options, max_sequence_length=int(defaults["max_sequence_length"]))

    def load():
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        pipe = load_pipeline(model, torch_dtype=getattr(torch, options.dtype))
        pipe.to(options.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, spec_from_pipeline(pipe, name=str(model), defaults=defaults)

    # Loaded on the thread that will run it, as glideserve's engine is (see engine.compute_thread).
    compute, (pipe, spec) = ComputeThread.starting_with(f"glideserve-{system}", load)
    return classes[system](pipe, spec, options, compute)

