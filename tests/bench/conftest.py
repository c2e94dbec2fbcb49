"""A small real HTTP image server for load-generator tests.

It speaks ``POST /v1/images/generations`` and records, server-side, the monotonic time
each request arrived. The prompt steers its behaviour: ``slow:<seconds> ...`` answers
after that many seconds, ``status:<code>[:<error code>] ...`` answers with that HTTP status (and error code,
default ``queue_full``).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def _make_app(received: list, base_delay_s: float):
    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    @app.post("/v1/images/generations")
    async def generate(request: Request):
        arrived = time.monotonic()
        body = await request.json()
        received.append((arrived, body))
        words = body["prompt"].split()
        head = words[0] if words else ""
        if head.startswith("status:"):
            parts = head.split(":")
            error_code = parts[2] if len(parts) > 2 else "queue_full"
            return JSONResponse({"error": {"message": "refused", "code": error_code}}, status_code=int(parts[1]))
        delay = float(head.split(":")[1]) if head.startswith("slow:") else base_delay_s
        if delay:
            await asyncio.sleep(delay)
        return {"created": int(time.time()), "data": [{"b64_json": "aW1hZ2U="}],
                "timings": {"total_s": delay, "images": [{"queued_s": delay / 2, "denoise_s": delay / 2,
                                                             "decode_s": 0.0, "total_s": delay, "steps": 1}]}}

    return app


class FakeImageServer:
    """uvicorn in a background thread; ``received`` holds ``(monotonic arrival, body)`` per request.

    Every answer takes at least ``base_delay_s``.
    """

    def __init__(self, base_delay_s: float = 0.0):
        import uvicorn

        from glideserve.bench.server_process import free_port

        self.received: list = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(_make_app(self.received, base_delay_s), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "FakeImageServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test image server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def image_server():
    server = FakeImageServer().start()
    yield server
    server.stop()


@pytest.fixture
def start_image_server():
    """Start servers with a given ``base_delay_s``; all are stopped after the test."""
    servers = []

    def start(base_delay_s: float = 0.0) -> FakeImageServer:
        servers.append(FakeImageServer(base_delay_s).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
