"""SIGTERM drains: the server keeps answering (503 for new work, /health 200, /ready 503),
admitted requests finish with their images, what outlives --drain-timeout fails with
503 drain_timeout, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from live_server import LiveServer, ServerProcess, decode_png
from metrics_scrape import delta, scrape

from glideserve.server import ServerConfig

STEPS = 60
NUM_REQUESTS = 3


def stream_request(url: str, index: int, started: threading.Event, signalled: threading.Event, out: dict,
                   steps: int = STEPS) -> None:
    body = {"prompt": f"a red circle {index}", "stream": True, "num_inference_steps": steps, "size": "128x128",
            "seed": index}
    steps_after_signal = 0
    try:
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=300) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event["type"] == "image_generation.progress" and event["step"] >= 1:
                    started.set()
                    steps_after_signal += signalled.is_set()
                out["last"] = event
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["steps_after_signal"] = steps_after_signal


def drain_answers(url: str) -> dict:
    """What a client sees while the server drains: a refused generation, /health, /ready."""
    refused = httpx.post(f"{url}/v1/images/generations", json={"prompt": "late", "num_inference_steps": 1},
                         timeout=30)
    return {"refused": refused, "health": httpx.get(f"{url}/health", timeout=30),
            "ready": httpx.get(f"{url}/ready", timeout=30)}


def wait_draining(url: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.02)


def test_sigterm_finishes_admitted_requests_then_exits_zero(tiny_model):
    server = ServerProcess(tiny_model, "--max-batch-rows", "8")
    try:
        signalled = threading.Event()
        results = [{} for _ in range(NUM_REQUESTS)]
        started = [threading.Event() for _ in range(NUM_REQUESTS)]
        threads = [threading.Thread(target=stream_request, args=(server.url, i, started[i], signalled, results[i]))
                   for i in range(NUM_REQUESTS)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(120), "a request never started running"
        signalled.set()
        server.proc.send_signal(signal.SIGTERM)
        wait_draining(server.url)
        during = drain_answers(server.url)
        for thread in threads:
            thread.join(300)
        assert server.proc.wait(timeout=120) == 0, "".join(server.log)
    finally:
        server.stop()
    refused = during["refused"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert int(refused.headers["retry-after"]) >= 1
    assert during["health"].status_code == 200
    assert during["ready"].status_code == 503 and during["ready"].json()["error"]["code"] == "shutting_down"
    for result in results:
        assert result.get("status") == 200 and "error" not in result, result
        assert result["last"]["type"] == "image_generation.completed"
        assert decode_png(result["last"]["b64_json"]).shape == (128, 128, 3)
        assert result["steps_after_signal"] > 0, "the request finished before the signal; the test proved nothing"


def test_drain_timeout_fails_what_is_left_with_503_and_exits_zero(tiny_model):
    server = ServerProcess(tiny_model, "--max-batch-rows", "2", "--drain-timeout", "1")
    try:
        started, signalled, streamed = threading.Event(), threading.Event(), {}
        thread = threading.Thread(target=stream_request, args=(server.url, 0, started, signalled, streamed, 200))
        thread.start()
        assert started.wait(120), "the stream never started running"
        plain = {}
        waiting = threading.Thread(target=lambda: plain.update(r=httpx.post(
            f"{server.url}/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 200,
                                                         "size": "128x128"}, timeout=120)))
        waiting.start()
        time.sleep(0.5)  # admitted, waiting behind the stream (one request per step)
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        waiting.join(60)
        assert server.proc.wait(timeout=60) == 0, "".join(server.log)
        elapsed = time.monotonic() - began
    finally:
        server.stop()
    assert elapsed < 15, f"the drain took {elapsed:.1f} s with --drain-timeout 1"
    assert streamed["status"] == 200 and streamed["last"]["type"] == "error", streamed
    assert streamed["last"]["error"]["code"] == "drain_timeout"
    response = plain["r"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "drain_timeout"
    assert "retry-after" in response.headers
    assert any("failing 2 unfinished request(s)" in line for line in server.log), "".join(server.log)


def test_drain_timeout_is_counted(tiny_model):
    long = {"prompt": "a cat", "num_inference_steps": 200, "size": "64x64"}
    with LiveServer(tiny_model, ServerConfig(warmup=False), max_batch_rows=2) as live:
        before = scrape(live.url)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{live.api}/images/generations", json=long, timeout=120)))
        thread.start()
        deadline = time.monotonic() + 60
        while live.backend.stats().num_running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert live.call(live.state.drain(0.2)) == 1
        thread.join(60)
        after = scrape(live.url)
    assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "drain_timeout"
    assert delta(before, after, "glideserve_requests_total", status="drain_timeout") == 1
    assert delta(before, after, "glideserve_http_responses_total", route="/v1/images/generations", status="503",
                 code="drain_timeout") == 1
