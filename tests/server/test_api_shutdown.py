"""SIGTERM drains: admitted requests finish with their images, new ones are refused, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from live_server import ServerProcess, decode_png

STEPS = 60
NUM_REQUESTS = 3


def stream_request(url: str, index: int, started: threading.Event, signalled: threading.Event, out: dict) -> None:
    body = {"prompt": f"a red circle {index}", "stream": True, "num_inference_steps": STEPS, "size": "128x128",
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
        refused = refused_after_signal(server.url)
        for thread in threads:
            thread.join(300)
        assert server.proc.wait(timeout=120) == 0, "".join(server.log)
    finally:
        server.stop()
    assert refused, "a new request was admitted after SIGTERM"
    for result in results:
        assert result.get("status") == 200 and "error" not in result, result
        assert result["last"]["type"] == "image_generation.completed"
        assert decode_png(result["last"]["b64_json"]).shape == (128, 128, 3)
        assert result["steps_after_signal"] > 0, "the request finished before the signal; the test proved nothing"


def refused_after_signal(url: str) -> bool:
    """Wait until the server stops admitting: a 503 envelope or a refused connection."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "late", "num_inference_steps": 1},
                                  timeout=30)
        except httpx.TransportError:
            return True
        if response.status_code == 503:
            return response.json()["error"]["code"] == "shutting_down"
        time.sleep(0.05)
    return False
