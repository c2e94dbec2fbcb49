"""LoadingApp: the app ``glideserve serve`` runs, listening while its models load and compile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Callable

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from glideserve.engine.startup import StartupProgress
from glideserve.errors import GlideServeError
from glideserve.server.accounting import HttpMetrics
from glideserve.server.backend import Backend
from glideserve.server.protocol import HealthResponse, StartingResponse, StartupStatus, error_response_body
from glideserve.server.state import ServerConfig

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
# Failures a user can fix from the command line: reported as one line, without a traceback.
USER_ERRORS = (GlideServeError, ValueError, FileNotFoundError)

BackendLoader = Callable[[StartupProgress], Backend]


def failure_message(exc: BaseException) -> str:
    """One line saying why start-up failed: a GlideServeError's message, else the exception's text or type."""
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


class LoadingState:
    """What the uvicorn runner needs of a server's state before the backend exists.

    ``http_metrics`` counts connections from the first one on and is handed to the served
    app, so ``/metrics`` later includes them. A drain while loading has nothing to wait for.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.http_metrics = HttpMetrics(CollectorRegistry())
        self.draining = False
        self.load_error: str | None = None

    def begin_drain(self) -> None:
        self.draining = True

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> int:
        self.begin_drain()
        return 0


class LoadingApp:
    """An ASGI app that answers at once and serves ``create_app(load(progress))`` once that returns.

    ``load`` builds the backend on a daemon thread (a SIGTERM during a long compile exits
    at once; nothing is admitted yet). Meanwhile ``/health`` answers 200, ``/ready`` 503
    ``not_ready`` with a ``startup`` object (stage, model, compiled shapes done of total),
    and every other route 503 ``not_ready`` with ``Retry-After``. Then the served app's own
    lifespan starts (its warm-up generation, after which ``/ready`` turns 200 and
    ``on_ready`` runs) and every request goes to it; shutdown drains it as before.

    A load that fails leaves ``/ready`` at 503 ``load_failed`` and calls ``on_failure`` with
    the exception (``glideserve serve`` then stops the server and exits with the message).
    ``state.server`` is the LoadingState until the served app exists, then the app's own.
    """

    def __init__(self, load: BackendLoader, config: ServerConfig, on_ready: Callable[[], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.progress = StartupProgress()
        self.state = State()
        self._loading = LoadingState(config)  # what the starting routes read, whatever state.server is
        self.state.server = self._loading
        self.app: FastAPI | None = None
        self._load, self._config, self._on_ready, self._on_failure = load, config, on_ready, on_failure
        self._served_lifespan: contextlib.AbstractAsyncContextManager | None = None
        self._starting = Starlette(routes=[Route("/health", self._health), Route("/ready", self._ready)],
                                   lifespan=self._lifespan)
        self._starting.add_route("/{path:path}", self._not_ready,
                                 methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan" and self.app is not None:
            await self.app(scope, receive, send)
        else:
            await self._starting(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        task = asyncio.create_task(self._load_and_serve())
        try:
            yield
        finally:
            self.state.server.begin_drain()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._served_lifespan is not None:
                await self._served_lifespan.__aexit__(None, None, None)

    async def _load_and_serve(self) -> None:
        loading = self._loading
        try:
            await self._serve(await self._load_on_thread())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.state.server = loading
            loading.load_error = failure_message(exc)
            if isinstance(exc, USER_ERRORS):
                log.error("start-up failed: %s", loading.load_error)
            else:
                log.error("start-up failed", exc_info=exc)
            if self._on_failure is not None:
                self._on_failure(exc)

    async def _serve(self, backend: Backend) -> None:
        """Start the served app's lifespan (the backend, its warm-up), then route every request to it."""
        from glideserve.server.app import create_app

        app = create_app(backend, self._config, self._on_ready, http_metrics=self._loading.http_metrics)
        self.progress.begin("starting the engine loop")
        self.state.server = app.state.server  # before its lifespan: without warm-up that calls on_ready
        served = app.router.lifespan_context(app)
        await served.__aenter__()
        self._served_lifespan, self.app = served, app

    async def _load_on_thread(self) -> Backend:
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def settle(setter, value) -> None:
            if not result.done():  # cancelled by a shutdown during the load
                setter(value)

        def run() -> None:
            try:
                backend = self._load(self.progress)
            except BaseException as exc:  # handed to the event loop
                outcome = (result.set_exception, exc)
            else:
                outcome = (result.set_result, backend)
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is exiting
                loop.call_soon_threadsafe(settle, *outcome)

        threading.Thread(target=run, name="glideserve-startup", daemon=True).start()
        return await result

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse(HealthResponse(status="ok").model_dump(exclude_none=True))

    async def _ready(self, request: Request) -> JSONResponse:
        loading = self._loading
        if loading.load_error is not None:
            body = error_response_body(503, f"start-up failed: {loading.load_error}", None, "load_failed")
            return JSONResponse(body, status_code=503)
        message = f"the server is {self.progress.describe()}; retry in a few seconds"
        body = StartingResponse(**error_response_body(503, message, None, "not_ready"),
                                startup=StartupStatus(**self.progress.snapshot()))
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _not_ready(self, request: Request) -> JSONResponse:
        message = (f"the server is still starting ({self.progress.describe()}); retry once GET /ready "
                   "answers 200")
        return JSONResponse(error_response_body(503, message, None, "not_ready"), status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
