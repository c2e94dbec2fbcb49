"""Slow and greedy clients are bounded: silent, half-header, half-body, idle and
non-reading connections are closed after their timeout, connections past the cap
are refused with 503, and normal requests are served all the while."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from live_server import LiveServer
from metrics_scrape import delta, scrape

from glideserve.server import ServerConfig
from glideserve.server.limits import HttpLimits

LIMITS = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_timeout_s=0.3, write_timeout_s=0.5,
                    max_connections=64)
FAST = {"prompt": "a red circle", "num_inference_steps": 1, "size": "32x32"}
GEN_HEAD = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def live(tiny_model):
    with LiveServer(tiny_model, ServerConfig(limits=LIMITS, warmup=False)) as server:
        yield server


def connect(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def envelope(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_silent_connection_is_closed(live):
    before = scrape(live.url)
    with connect(live) as sock:
        data, waited = read_until_closed(sock)
    assert data == b"" and waited < 5
    assert delta(before, scrape(live.url), "glideserve_connection_timeouts_total", kind="header") == 1


@pytest.mark.parametrize("partial", ["P", "POST /v1/images/gen", GEN_HEAD, GEN_HEAD + "Content-Length: 10\r\n"])
def test_partial_headers_get_408(live, partial):
    before = scrape(live.url)
    with connect(live) as sock:
        sock.sendall(partial.encode())
        data, waited = read_until_closed(sock)
    status, error = envelope(data)
    assert status == 408 and error["code"] == "header_timeout" and waited < 5
    after = scrape(live.url)
    assert delta(before, after, "glideserve_http_responses_total", route="connection", status="408",
                 code="header_timeout") == 1


def test_a_trickled_body_gets_408_and_is_closed(live):
    before = scrape(live.url)
    with connect(live) as sock:
        sock.sendall((GEN_HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"prompt": ')
        time.sleep(0.2)
        sock.sendall(b'"a')  # still trickling: the timeout is on the whole body, not per chunk
        data, waited = read_until_closed(sock)
    status, error = envelope(data)
    assert status == 408 and error["code"] == "body_timeout" and waited < 5
    after = scrape(live.url)
    assert delta(before, after, "glideserve_connection_timeouts_total", kind="body") == 1
    assert delta(before, after, "glideserve_requests_total", status="body_timeout") == 1


def test_an_idle_keep_alive_connection_is_closed(live):
    body = json.dumps(FAST).encode()
    with connect(live) as sock:
        sock.sendall((GEN_HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and waited < 60


def test_a_client_that_does_not_read_is_disconnected(live):
    before = scrape(live.url)
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(live, rcvbuf=4096) as sock:
        sock.sendall(request * 200)  # pipelined answers pile up in the server's buffer
        time.sleep(LIMITS.write_timeout_s * 4)
        data, _ = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 200") < 200
    assert delta(before, scrape(live.url), "glideserve_connection_timeouts_total", kind="write") == 1


def test_normal_requests_are_served_while_slow_clients_hold_connections(live):
    held = [connect(live) for _ in range(8)]
    for index, sock in enumerate(held):
        sock.sendall(GEN_HEAD.encode()[: 5 + index])
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            for _ in range(3):
                assert client.post("/v1/images/generations", json=FAST).status_code == 200
        for sock in held:
            status, error = envelope(read_until_closed(sock)[0])
            assert (status, error["code"]) == (408, "header_timeout")
    finally:
        for sock in held:
            sock.close()


def test_connections_past_the_cap_get_503(tiny_model):
    limits = HttpLimits(max_connections=4, header_timeout_s=30)
    with LiveServer(tiny_model, ServerConfig(limits=limits, warmup=False)) as server:
        held = [connect(server) for _ in range(4)]
        try:
            time.sleep(0.2)
            with connect(server) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                status, error = envelope(read_until_closed(extra)[0])
            assert (status, error["code"]) == (503, "too_many_connections")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while True:  # the held connections close; the server serves again
            response = httpx.get(f"{server.url}/health", timeout=10)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert response.status_code == 200
        samples = scrape(server.url)
        assert samples[("glideserve_http_responses_total",
                        (("code", "too_many_connections"), ("route", "connection"), ("status", "503")))] >= 1
        assert samples[("glideserve_open_connections", ())] <= 2  # this scrape, at most one closing


def test_malformed_http_gets_a_400_envelope(live):
    with connect(live) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        status, error = envelope(read_until_closed(sock)[0])
    assert (status, error["code"]) == (400, "bad_http_request")


def test_after_a_413_the_rest_of_the_body_is_bounded_and_idle_is_not_a_timeout(live):
    body = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    head = (GEN_HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode()
    before = scrape(live.url)
    with connect(live) as sock:  # the whole body arrives: idle keep-alive afterwards
        sock.sendall(head + body)
        data, _ = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 413")
    with connect(live) as sock:  # the rest of the body never comes: answered, so merely idle
        sock.sendall(head + body[:1000])
        data, waited = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 413") and waited < 5
    with connect(live) as sock:  # the rest trickles in: bounded like headers, counted as a slow body
        sock.sendall(head + body[:1000])
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        for start in range(1000, 70_000, 100):
            try:
                sock.sendall(body[start:start + 100])
            except OSError:
                break
            time.sleep(0.05)
        read_until_closed(sock)
    after = scrape(live.url)
    assert delta(before, after, "glideserve_connection_timeouts_total", kind="header") == 0
    assert delta(before, after, "glideserve_connection_timeouts_total", kind="body") == 1
