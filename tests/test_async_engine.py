"""AsyncEngine: per-step progress, abort at the next step, bounded queue, draining shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from glideserve import AsyncEngine, Engine, GenerationParams, GenerationResult, Queued, RequestFailed, StepProgress
from glideserve.errors import EngineStoppedError, QueueFullError


@pytest.fixture()
def engine(tiny_sd3_dir):
    return AsyncEngine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=4, max_waiting=3)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def collect(stream):
    return [event async for event in stream]


def test_progress_then_result_and_same_image_as_sync_engine(engine, tiny_sd3_dir):
    params = GenerationParams("a red circle", num_inference_steps=5, seed=3, guidance_scale=3.0)

    async def main():
        await engine.start()
        events = [e async for e in engine.generate(params)]
        await engine.shutdown()
        return events

    events = run(main())
    steps = [e.step for e in events if isinstance(e, StepProgress)]
    assert steps == [1, 2, 3, 4, 5] and all(e.total == 5 for e in events if isinstance(e, StepProgress))
    assert isinstance(events[-1], GenerationResult)
    sync = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16).generate([params])[0]
    assert np.array_equal(np.asarray(sync.image), np.asarray(events[-1].image))


def test_abort_frees_a_running_request_at_the_next_step(engine):
    seen_steps = []
    engine.add_step_listener(lambda s: seen_steps.append(s.num_requests))

    async def main():
        await engine.start()
        stream = await engine.add_request(GenerationParams("long", num_inference_steps=200, seed=1))
        async for event in stream:
            if isinstance(event, StepProgress) and event.step == 2:
                assert await engine.abort(stream.request_id)
                break
        rest = await collect(stream)
        await engine.shutdown()
        return event, rest

    last_progress, rest = run(main())
    failure = rest[-1]
    assert isinstance(failure, RequestFailed) and failure.reason == "aborted"
    progress_after = [e for e in rest if isinstance(e, StepProgress)]
    assert len(progress_after) <= 1  # at most the step already running when abort arrived
    assert engine.stats().num_running == 0 and len(engine.core.runner.batch) == 0


def test_queue_bound_and_waiting_positions(engine):
    async def main():
        await engine.start()
        streams = [await engine.add_request(GenerationParams(f"p{i}", num_inference_steps=3, seed=i))
                   for i in range(3)]  # batch 4 rows = 2 CFG requests run, 1 waits
        with pytest.raises(QueueFullError):
            for i in range(3, 10):
                streams.append(await engine.add_request(GenerationParams(f"p{i}", num_inference_steps=3, seed=i)))
        results = [await collect(s) for s in streams]
        await engine.shutdown()
        return results

    results = run(main())
    assert all(isinstance(events[-1], GenerationResult) for events in results)
    assert any(isinstance(e, Queued) for events in results for e in events)


def test_shutdown_drains_admitted_requests_and_refuses_new_ones(engine):
    async def main():
        await engine.start()
        streams = [await engine.add_request(GenerationParams(f"p{i}", num_inference_steps=6, seed=i))
                   for i in range(3)]
        collectors = [asyncio.create_task(collect(s)) for s in streams]
        await asyncio.sleep(0)
        shutdown = asyncio.create_task(engine.shutdown(drain=True))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineStoppedError):
            await engine.add_request(GenerationParams("late", num_inference_steps=2))
        await shutdown
        return [await c for c in collectors]

    results = run(main())
    assert all(isinstance(events[-1], GenerationResult) for events in results)


def test_the_model_is_loaded_and_stepped_on_one_thread(tiny_sd3_dir, monkeypatch):
    # A second OpenMP pool (one per thread that runs kernels) slows every step: see engine.compute_thread.
    import threading

    from glideserve.engine.core import EngineCore

    threads = []
    load = EngineCore.from_pretrained
    monkeypatch.setattr(EngineCore, "from_pretrained", classmethod(
        lambda cls, *a, **k: (threads.append(threading.current_thread()), load(*a, **k))[1]))
    engine = AsyncEngine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    engine.add_step_listener(lambda stats: threads.append(threading.current_thread()))

    async def main():
        await engine.start()
        await collect(await engine.add_request(GenerationParams("a red circle", num_inference_steps=2, seed=0)))
        await engine.shutdown()

    run(main())
    assert len(threads) >= 3 and all(t is threads[0] for t in threads)
    assert threads[0] is not threading.main_thread() and not threads[0].is_alive()
