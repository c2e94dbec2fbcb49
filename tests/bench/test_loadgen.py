"""Open-loop load generator against a real local HTTP server."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from glideserve.bench.arrivals import constant_arrivals, poisson_arrivals
from glideserve.bench.loadgen import RequestTemplate, measure_isolated_latency, run_open_loop, toy_captions
from glideserve.bench.records import DROPPED, LATE, ON_TIME, REFUSED

# A response this slow would push every later arrival of a closed-loop client back by a
# second; the schedule tolerance below is a small fraction of it.
SLOW_S = 1.0
TOLERANCE_S = 0.1


def _arrival_errors(server, schedule):
    """Server-side arrival minus schedule, per request, less the median (the constant network delay)."""
    by_seed = sorted((body["seed"], arrived) for arrived, body in server.received)
    assert [seed for seed, _ in by_seed] == list(range(len(schedule)))
    delays = [arrived - offset for (_, arrived), offset in zip(by_seed, schedule.offsets)]
    typical = statistics.median(delays)
    return [d - typical for d in delays]


def test_arrivals_follow_schedule_despite_slow_responses(image_server):
    schedule = constant_arrivals(10.0, count=15)
    prompts = [f"slow:{SLOW_S} a red circle on a blue background", "a green square on a white background"]
    records = asyncio.run(run_open_loop(image_server.url, schedule, prompts, RequestTemplate(),
                                        slo_s=None, timeout_s=30.0))
    errors = _arrival_errors(image_server, schedule)
    assert max(abs(e) for e in errors) < TOLERANCE_S, errors
    assert statistics.median(abs(e) for e in errors) < TOLERANCE_S / 5, errors
    assert all(r.status == ON_TIME and r.completed for r in records)
    slow = [r.latency_s for r in records if r.index % 2 == 0]
    fast = [r.latency_s for r in records if r.index % 2 == 1]
    assert min(slow) > max(fast)  # the slow ones really were slow while later ones went out
    assert max(abs(r.send_lag_s) for r in records) < TOLERANCE_S


def test_poisson_schedule_is_followed(image_server):
    schedule = poisson_arrivals(20.0, count=30, seed=3)
    asyncio.run(run_open_loop(image_server.url, schedule, toy_captions(5), RequestTemplate(),
                              slo_s=None, timeout_s=30.0))
    errors = _arrival_errors(image_server, schedule)
    assert statistics.median(abs(e) for e in errors) < TOLERANCE_S / 5, errors
    assert max(abs(e) for e in errors) < TOLERANCE_S, errors


def test_outcomes_follow_slo_status_and_timeout(image_server):
    schedule = constant_arrivals(50.0, count=8)
    prompts = ["a red circle on a blue background", "slow:0.5 late", "status:429:slo_unattainable refused",
               "status:503:shutting_down stopping", "slow:5 never answered in time",
               "status:503:deadline_exceeded dropped", "status:500:generation_failed broken", "status:429 full"]
    records = asyncio.run(run_open_loop(image_server.url, schedule, prompts, RequestTemplate(),
                                        slo_s=0.3, timeout_s=1.0))
    assert [r.status for r in records] == [ON_TIME, LATE, REFUSED, REFUSED, LATE, DROPPED, DROPPED, REFUSED]
    assert [r.completed for r in records] == [True, True] + [False] * 6
    assert [r.http_status for r in records[:4]] == [200, 200, 429, 503]
    assert [r.error_code for r in records] == ["", "", "slo_unattainable", "shutting_down", "", "deadline_exceeded",
                                               "generation_failed", "queue_full"]
    assert records[2].answer_s < 0.3  # a refusal is answered, and timed, like any other answer
    assert records[1].queued_s == pytest.approx(0.25)  # copied from the response's timing block
    assert records[4].latency_s is None and "timeout" in records[4].error
    assert all(r.slo_s == 0.3 for r in records)


def test_request_bodies_carry_template_fields(image_server):
    template = RequestTemplate(size="64x32", num_inference_steps=4, guidance_scale=2.5, base_seed=100)
    asyncio.run(run_open_loop(image_server.url, constant_arrivals(100.0, count=2), ["a cat"], template,
                              slo_s=1.5, timeout_s=10.0))
    bodies = sorted((body for _, body in image_server.received), key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [100, 101]
    assert bodies[0] == {"prompt": "a cat", "n": 1, "response_format": "b64_json", "seed": 100, "size": "64x32",
                         "num_inference_steps": 4, "guidance_scale": 2.5, "slo_ms": 1500}


def test_isolated_latency_is_measured_one_request_at_a_time(image_server):
    latency = asyncio.run(measure_isolated_latency(image_server.url, ["slow:0.2 a red circle"], RequestTemplate(),
                                                   count=2, warmup=1))
    assert latency >= 0.2
    arrivals = sorted(arrived for arrived, _ in image_server.received)
    assert len(arrivals) == 3
    # each request leaves only after the previous one answered
    assert all(b - a >= 0.2 for a, b in zip(arrivals, arrivals[1:]))


def test_isolated_latency_refuses_a_failing_server(image_server):
    with pytest.raises(RuntimeError, match="failed"):
        asyncio.run(measure_isolated_latency(image_server.url, ["status:503 down"], RequestTemplate()))


def test_toy_captions_are_deterministic():
    assert toy_captions(4, seed=1) == toy_captions(4, seed=1)
    for caption in toy_captions(20):
        assert caption.startswith("a ") and caption.endswith(" background")


def test_a_server_process_starts_once(tmp_path):
    """`with ServerProcess(...).start()` would start a second server and orphan the first: refused."""
    from glideserve.bench.server_process import ServerProcess

    server = ServerProcess("glideserve", "glide-tiny", log_path=tmp_path / "server.log")
    server._popen = object()  # as after start()
    with pytest.raises(RuntimeError, match="started already"):
        server.start()
