"""Cancellation: a client that goes away, or DELETE /v1/requests/{id}, frees the slot."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

WAIT_S = 60.0
LONG = {"prompt": "a cat", "num_inference_steps": 200, "size": "64x64"}


class StepGate:
    """Engine step listener that can hold the engine thread after a step.

    While held the engine cannot run another step, so a test can act (disconnect,
    cancel) between two steps and then check what the next steps contained.
    ``requests_per_step`` records how many requests each step advanced.
    """

    def __init__(self):
        self.requests_per_step: list[int] = []
        self._arm = threading.Event()
        self.held = threading.Event()
        self._release = threading.Event()

    def __call__(self, step) -> None:
        self.requests_per_step.append(step.num_requests)
        if step.num_requests and self._arm.is_set():
            self._arm.clear()
            self.held.set()
            self._release.wait(WAIT_S)

    def hold_after_next_step(self) -> None:
        self.held.clear()
        self._release.clear()
        self._arm.set()

    def release(self) -> int:
        """Let the engine go on; returns the index of the first step run after release."""
        index = len(self.requests_per_step)
        self._release.set()
        return index


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_first_step(lines) -> None:
    """Read SSE lines up to the first step event. ``lines`` must stay referenced by the
    caller: closing the line iterator early would close the connection."""
    for line in lines:
        if line.startswith("data:") and json.loads(line[5:]).get("step", 0) >= 1:
            return
    raise AssertionError("the stream ended before the first step")


@pytest.fixture(scope="module")
def gate(server):
    gate = StepGate()
    server.backend.add_step_listener(gate)
    return gate


def images_generated(server) -> float:
    return server.state.metrics.registry.get_sample_value("glideserve_images_generated_total")


def assert_freed_without_another_step(server, gate: StepGate) -> None:
    wait_for(lambda: not server.state.jobs, "the server to abort the request")
    first_after = gate.release()
    stats = server.backend.stats
    wait_for(lambda: stats().num_running == 0 and stats().num_waiting == 0, "the engine to go idle")
    later = gate.requests_per_step[first_after:]
    assert not any(later), f"the cancelled request kept running: requests per later step {later}"


def test_disconnected_stream_stops_within_one_step(server, gate):
    images_before = images_generated(server)
    with httpx.stream("POST", f"{server.api}/images/generations", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        wait_for_first_step(lines)
        gate.hold_after_next_step()
        assert gate.held.wait(WAIT_S)
    # Leaving the block closed the connection while the engine was held between two steps.
    assert_freed_without_another_step(server, gate)
    assert images_generated(server) == images_before


def test_disconnected_plain_request_stops_within_one_step(server, gate):
    body = json.dumps(LONG).encode()
    gate.hold_after_next_step()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert gate.held.wait(WAIT_S)
    assert_freed_without_another_step(server, gate)


def test_delete_cancels_a_streaming_request(server):
    with httpx.stream("POST", f"{server.api}/images/generations", json={**LONG, "stream": True}) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        wait_for_first_step(lines)
        cancel = httpx.delete(f"{server.api}/requests/{request_id}")
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        last = [json.loads(line[5:]) for line in lines if line.startswith("data:")][-1]
    assert last["type"] == "error" and last["error"]["code"] == "cancelled"
    assert last["error"]["type"] == "cancelled"
    assert httpx.delete(f"{server.api}/requests/{request_id}").status_code == 404


def test_delete_cancels_a_plain_request_by_its_client_chosen_id(server):
    result: dict = {}

    def send() -> None:
        result["response"] = httpx.post(f"{server.api}/images/generations", json=LONG,
                                        headers={"X-Request-Id": "my-request-1"}, timeout=WAIT_S)

    sender = threading.Thread(target=send)
    sender.start()
    wait_for(lambda: "my-request-1" in server.state.jobs, "the request to be admitted")
    assert httpx.delete(f"{server.api}/requests/my-request-1").status_code == 200
    sender.join(WAIT_S)
    response = result["response"]
    assert response.status_code == 499
    assert response.json()["error"]["code"] == "cancelled"
