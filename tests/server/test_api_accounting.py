"""Every answer carries a code and is counted once, under the right reason, in /metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from live_server import LiveServer
from metrics_scrape import deltas, scrape, wait_for_metrics

from glideserve.server import ServerConfig

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN = "/v1/images/generations"
FAST = {"prompt": "a red circle", "num_inference_steps": 2, "size": "32x32"}
LONG = {"prompt": "a red circle", "num_inference_steps": 200, "size": "64x64"}


@pytest.fixture(scope="module")
def live(tiny_model):
    config = ServerConfig(model_id="tiny", api_key=KEY, max_queue=2, max_body_bytes=4096)
    with LiveServer(tiny_model, config, max_waiting=2, max_batch_rows=2) as server:
        yield server


def raw_request(server, head: str, body: bytes = b"", read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        return sock.recv(65536) if read else b""


def wait_running(server, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while server.backend.stats().num_running < count:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.01)


def test_one_of_each_class_is_counted_once(live):
    client = httpx.Client(base_url=live.url, headers=AUTH, timeout=60)
    before = scrape(live.url)
    expected_http: dict[tuple, int] = {}
    expected_generation: dict[str, int] = {}

    def expect(route: str, status: int, code: str, generation: str | None = None) -> None:
        key = (("code", code), ("route", route), ("status", str(status)))
        expected_http[key] = expected_http.get(key, 0) + 1
        if generation is not None:
            expected_generation[generation] = expected_generation.get(generation, 0) + 1

    def check(response: httpx.Response, status: int, code: str, route: str = GEN) -> None:
        assert response.status_code == status, response.text
        if status >= 400:
            assert response.json()["error"]["code"] == code
        counted = route == GEN and status != 405  # a PUT is no generation request
        expect(route, status, code, (code if status >= 400 else "completed") if counted else None)

    check(client.post(GEN, json=FAST), 200, "ok")
    check(client.post(GEN, json={**FAST, "size": "²x64"}), 400, "invalid_request")
    check(client.post(GEN, json={**FAST, "prompt": "\u200b"}), 400, "invalid_request")
    check(client.post(GEN, content=b"{not json", headers={"content-type": "application/json"}), 400,
          "invalid_request")
    check(client.post(GEN, content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}), 400,
          "invalid_request")
    check(client.post(GEN, json=FAST, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    check(client.post(GEN, json={**FAST, "model": "dall-e-3"}), 404, "model_not_found")
    check(client.post(GEN, json={**FAST, "n": 3}), 429, "queue_full")
    check(client.post(GEN, json={"prompt": "a" * 5000}), 413, "request_too_large")
    check(client.get("/v1/nothing"), 404, "not_found", route="unmatched")
    check(client.put(GEN), 405, "method_not_allowed", route=GEN)
    check(client.delete("/v1/requests/req_unknown"), 404, "not_found", route="/v1/requests/{request_id}")
    check(client.get("/health"), 200, "ok", route="/health")

    # A body streamed in chunks (no Content-Length) past the limit.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'
    check(client.post(GEN, content=chunks(), headers={"content-type": "application/json"}), 413,
          "request_too_large")

    # DELETE of a running request: the plain request ends with 499 cancelled.
    with httpx.Client(base_url=live.url, headers={**AUTH, "X-Request-Id": "to-cancel"}, timeout=60) as other:
        import threading

        result = {}
        thread = threading.Thread(target=lambda: result.update(r=other.post(GEN, json=LONG)))
        thread.start()
        wait_running(live)
        check(client.delete("/v1/requests/to-cancel"), 200, "ok", route="/v1/requests/{request_id}")
        thread.join(60)
    check(result["r"], 499, "cancelled")

    # A client that closes mid-body, and one that closes while its image is generated.
    head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    raw_request(live, head + "Content-Length: 100\r\n\r\n", b'{"prompt": ', read=False)
    expect(GEN, 499, "client_disconnected", "client_disconnected")
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        wait_running(live)
    expect(GEN, 499, "cancelled", "cancelled")

    # A stream read to the end, and one whose client goes away after the first step.
    with client.stream("POST", GEN, json={**FAST, "stream": True}) as response:
        assert response.status_code == 200 and list(response.iter_lines())
    expect(GEN, 200, "ok", "completed")
    with client.stream("POST", GEN, json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:") and json.loads(line[5:])["step"] >= 1)
    expect(GEN, 499, "client_disconnected", "cancelled")

    skip = {"route": "/metrics"}
    after = wait_for_metrics(live.url, lambda s: deltas(before, s, "glideserve_http_responses_total", skip)
                             == {k: float(v) for k, v in expected_http.items()}
                             and server_idle(live))
    assert deltas(before, after, "glideserve_http_responses_total", skip) == \
        {k: float(v) for k, v in expected_http.items()}
    generation = {dict(k)["status"]: v for k, v in deltas(before, after, "glideserve_requests_total").items()}
    assert generation == {k: float(v) for k, v in expected_generation.items()}
    client.close()


def server_idle(live) -> bool:
    stats = live.backend.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and not live.state.jobs

