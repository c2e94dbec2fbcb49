"""Deadline scheduling through HTTP: refusals, drops and priorities, on the real scheduler and a fake model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from scheduling_backend import SchedulingBackend
from scheduling_fakes import linear_profile

from glideserve.config import SchedulerConfig
from glideserve.server import ServerConfig, create_app

GENERATIONS = "/v1/images/generations"
STEP_PER_ROW_S = 0.05  # 4 steps x 2 rows (CFG) x 0.05 s: 0.4 s per request alone


def make_client(server_config: ServerConfig = ServerConfig(warmup=False), **scheduler_options):
    options = dict(max_batch_rows=16, policy="slack", admission_margin=0.0)
    options.update(scheduler_options)
    backend = SchedulingBackend(linear_profile(STEP_PER_ROW_S), SchedulerConfig(**options),
                                group_s=lambda tokens, rows: rows * STEP_PER_ROW_S)
    return backend, TestClient(create_app(backend, server_config))


def metric(client: TestClient, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{selector}}} " if labels else f"{name} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def body(**fields) -> dict:
    return {"prompt": "a red circle", "num_inference_steps": 4, "response_format": "b64_json", **fields}


def test_unattainable_slo_is_refused_at_once_with_the_prediction_and_retry_after():
    backend, client = make_client()
    with client:
        start = time.perf_counter()
        refused = client.post(GENERATIONS, json=body(slo_ms=100))
        answered_in = time.perf_counter() - start
        served = client.post(GENERATIONS, json=body(slo_ms=5000))
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "slo_unattainable" and error["param"] == "slo_ms"
        assert "predicted latency 0.40 s" in error["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert answered_in < 1.0  # answered by admission, not after running anything
        assert served.status_code == 200 and served.json()["timings"]["slo_met"] is True
        assert list(backend.runner.steps_run.values()) == [4]  # the refused request took no step
        assert metric(client, "glideserve_requests_total", status="slo_unattainable") == 1
        assert metric(client, "glideserve_scheduler_decisions_total", decision="refused") == 1
        assert client.get("/v1/stats").json()["refused_total"] == 1


def test_server_default_slo_applies_and_priority_reaches_the_scheduler():
    backend, client = make_client(ServerConfig(warmup=False, default_slo_ms=100))
    with client:
        assert client.post(GENERATIONS, json=body()).status_code == 429  # the 100 ms default is infeasible
        response = client.post(GENERATIONS, json=body(slo_ms=5000, priority=7))
        assert response.status_code == 200, response.text
        assert response.json()["timings"]["slo_ms"] == 5000
        assert (backend.received[-1].slo_ms, backend.received[-1].priority) == (5000, 7)


def _stall_once(backend: SchedulingBackend, seconds: float):
    stalled = []

    def before_step():
        if not stalled:
            stalled.append(True)
            backend.clock.advance(seconds)
    return before_step


def test_admitted_request_that_falls_far_behind_is_dropped_with_503():
    backend, client = make_client(drop_late_after=0.5)
    backend.before_step = _stall_once(backend, 10.0)  # the machine stalls right after admission
    with client:
        response = client.post(GENERATIONS, json=body(slo_ms=1000))
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert metric(client, "glideserve_requests_total", status="deadline_exceeded") == 1
        assert metric(client, "glideserve_scheduler_decisions_total", decision="dropped") == 1
        assert sum(backend.runner.steps_run.values()) == 0  # no step was spent on it


def test_a_streaming_client_gets_an_error_event_when_dropped():
    backend, client = make_client(drop_late_after=0.5)
    backend.before_step = _stall_once(backend, 10.0)
    with client:
        with client.stream("POST", GENERATIONS, json=body(slo_ms=1000, stream=True)) as response:
            assert response.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "deadline_exceeded"


def test_without_drops_a_late_request_is_still_served():
    backend, client = make_client(drop_late_after=None)
    backend.before_step = _stall_once(backend, 10.0)
    with client:
        response = client.post(GENERATIONS, json=body(slo_ms=1000))
        assert response.status_code == 200
        assert metric(client, "glideserve_scheduler_decisions_total", decision="dropped") == 0


@pytest.mark.parametrize("priorities", [(0, 5, -5), (-1, 3, 2)])
def test_priority_orders_best_effort_requests(priorities):
    # One CFG request per step, so the order in which requests take their first step is the service order.
    backend, client = make_client(max_batch_rows=2)
    with client, ThreadPoolExecutor(len(priorities)) as pool:
        backend.hold()
        futures = [pool.submit(client.post, GENERATIONS, json=body(priority=p), headers={"X-Request-Id": f"p{i}"})
                   for i, p in enumerate(priorities)]
        deadline = time.monotonic() + 10
        while backend.scheduler.num_waiting < len(priorities) and time.monotonic() < deadline:
            time.sleep(0.005)
        backend.release()
        assert all(f.result().status_code == 200 for f in futures)
    first_steps = []
    for plan in backend.runner.plans:
        first_steps += [rid for rid in plan.scheduled if rid not in first_steps]
    expected = [f"p{i}-0" for i in sorted(range(len(priorities)), key=lambda i: -priorities[i])]
    assert first_steps == expected
