"""Running the app under uvicorn with a draining shutdown and bounded connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Generator

import uvicorn
from fastapi import FastAPI

from glideserve.server.limits import HttpLimits

DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Once the drain is over, how long uvicorn waits for connections still open (a body
# being uploaded, an answer being written) before cancelling them.
FINAL_CLOSE_TIMEOUT_S = 5

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings that enforce the app's HttpLimits (timeouts, connection cap)."""
    from glideserve.server.connections import guarded_protocol

    state = app.state.server
    limits: HttpLimits = state.config.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=guarded_protocol(limits, state.http_metrics),
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          timeout_graceful_shutdown=FINAL_CLOSE_TIMEOUT_S)


class DrainingServer(uvicorn.Server):
    """uvicorn server whose SIGTERM/SIGINT drains the app, then exits successfully.

    On the first signal the server keeps listening: new generations get 503
    ``shutting_down`` with ``Retry-After``, ``/ready`` answers 503 and ``/health``
    200, while admitted requests run to completion. Once none is left, or after the
    app's ``drain_timeout_s`` (which fails the rest with 503 ``drain_timeout``),
    uvicorn closes the listener and the connections and the process exits 0. A
    second signal exits at once. uvicorn would re-raise the signal at exit (making
    the process die by it); a completed drain is a normal exit, so this server does not.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        state = self._app.state.server
        if self._loop is None or state.draining or self.should_exit:
            # A second signal, or one before the server runs: stop without waiting.
            self.force_exit = self.should_exit = True
            return
        state.begin_drain()
        # A signal handler runs between two bytecodes of the loop's own thread: schedule, don't await.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        state = self._app.state.server
        try:
            failed = await state.drain(state.config.limits.drain_timeout_s)
            log.info("drain complete%s; closing the listener", f" ({failed} request(s) timed out)" if failed else "")
        finally:
            self.should_exit = True

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
        """The port actually listened on (useful with port 0), once started; None before (as when a server
        without warm-up reports ready during its start-up)."""
        for server in getattr(self, "servers", ()):
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None


def display_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
