"""Running the app under uvicorn with a draining shutdown."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Generator

import uvicorn
from fastapi import FastAPI

DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn server whose SIGTERM/SIGINT drains the app and then exits successfully.

    On the signal the app starts answering new generations with 503, uvicorn stops
    accepting connections and waits for every in-flight response, and the lifespan
    shutdown drains the backend. uvicorn would then re-raise the signal (making the
    process die by it); a completed drain is a normal exit, so this server does not.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame) -> None:
        self._app.state.server.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in DRAIN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def bound_port(self) -> int | None:
        """The port actually listened on (useful with port 0), once started."""
        for server in self.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None


def display_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
