"""The FastAPI application: ``create_app(backend, config)`` wires routes, errors and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from glideserve.server import fine_tuning, images
from glideserve.server.accounting import AccountingMiddleware, HttpMetrics, redact_access_log
from glideserve.server.backend import Backend
from glideserve.server.errors import BodyReadError, BodySizeLimitMiddleware, error_json, install_error_handlers
from glideserve.server.images import get_state, require_api_key
from glideserve.server.limits import BodyTimeoutMiddleware
from glideserve.errors import LoraUploadsDisabledError
from glideserve.server.protocol import (ErrorResponse, HealthResponse, LoraCard, LoraDeleted, LoraList, ModelCard,
                                        ModelList, ServerStats)
from glideserve.server.state import CASCADE_MODEL_NAME, ServerConfig, ServerState

log = logging.getLogger(__name__)


def create_app(backend: Backend, config: ServerConfig = ServerConfig(),
               on_ready: Callable[[], None] | None = None, http_metrics: HttpMetrics | None = None) -> FastAPI:
    """An app serving ``backend``; its lifespan starts the backend and drains it at exit.

    Start-up starts the backend and launches the warm-up generation in the
    background, so ``/health`` answers at once and ``/ready`` turns 200 (and
    ``on_ready`` is called) once the model has produced an image. Shutdown stops
    admitting and waits until every admitted request has finished. ``http_metrics``: the
    connection and response counters to keep (those of a server that listened while loading).
    """
    state = ServerState(backend, config, on_ready, http_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        backend.add_step_listener(state.metrics.on_step)
        sampler = asyncio.create_task(state.dashboard.run()) if state.dashboard is not None else None
        warmup = asyncio.create_task(state.warm_up()) if config.warmup else None
        if warmup is None:
            state.mark_ready()
        try:
            yield
        finally:
            state.begin_drain()
            if sampler is not None:
                sampler.cancel()
            if warmup is not None:
                warmup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warmup
            await backend.shutdown(drain=True)

    # /docs and /redoc load their scripts from a public CDN, which fails offline; opt in.
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None}
    app = GlideServeApp(title="glideserve", summary="OpenAI-compatible image generation with step-level batching",
                        version=_version(), lifespan=lifespan, **docs)
    redact_access_log()
    app.state.server = state
    install_error_handlers(app)
    service = getattr(backend, "fine_tuning", None)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes,
                       upload_max_bytes=config.max_lora_upload_bytes if config.lora_uploads else None,
                       dataset_max_bytes=None if service is None else service.limits.max_zip_bytes)
    body_timeouts = state.http_metrics.connection_timeouts.labels(kind="body")
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=config.limits.body_timeout_s, on_timeout=body_timeouts.inc)
    app.include_router(images.router)
    app.include_router(images.public_router)
    app.include_router(_v1_router())
    app.include_router(_ops_router())
    app.include_router(fine_tuning.router())
    if state.dashboard is not None:
        app.include_router(_dashboard_router())
    return app


class GlideServeApp(FastAPI):
    """FastAPI with the HTTP accounting outside every other layer.

    Middleware added with ``add_middleware`` runs inside Starlette's error
    middleware, so it never sees the 500 answers; counting there would miss them.
    """

    def build_middleware_stack(self):
        return AccountingMiddleware(super().build_middleware_stack(), self.state.server.http_metrics)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glideserve")
    except PackageNotFoundError:
        return "0+source"


MODEL_QUERY = Query(None, max_length=64, description="the model the adapter is for (default: the default model)")
UPLOAD_ERRORS = {status: {"model": ErrorResponse} for status in (403, 409, 413)}


def _uploads_on(request: Request) -> ServerState:
    state = get_state(request)
    if not state.config.lora_uploads:
        raise LoraUploadsDisabledError("LoRA uploads are off; start the server with --lora-uploads")
    return state


def _v1_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                       responses={401: {"model": ErrorResponse}})

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """The models this server serves, the default first, with their defaults and whether they are loaded."""
        state = get_state(request)
        cards = state.model_cards()
        data = [ModelCard(id=c["name"], created=state.created, family=c.get("family"),
                          default_size=c.get("default_size"), default_steps=c.get("default_steps"),
                          loaded=c.get("loaded", True), default=i == 0 and state.cascade is None,
                          compiled=c.get("compiled"))
                for i, c in enumerate(cards)]
        if state.cascade is not None:  # the default: each stage runs at its own model's defaults
            heavy = next(c for c in cards if c["name"] == state.cascade.config.heavy)
            data.insert(0, ModelCard(id=CASCADE_MODEL_NAME, created=state.created, family=heavy.get("family"),
                                     default_size=heavy.get("default_size"), default=True))
        return ModelList(data=data)

    @router.get("/loras", response_model=LoraList)
    async def list_loras(request: Request, model: str | None = MODEL_QUERY) -> LoraList:
        """The LoRA adapters requests may name (from --lora-dir), and which are resident, for one model."""
        state = get_state(request)
        cards = await asyncio.to_thread(state.backend.loras, state.engine_model(model))
        return LoraList(data=[LoraCard(**card) for card in cards])

    @router.post("/loras", response_model=LoraCard, status_code=201, responses=UPLOAD_ERRORS)
    async def upload_lora_form(request: Request, file: UploadFile = File(description="one adapter .safetensors"),
                               name: str | None = Form(None, description="name to keep it under (default: the "
                                                       "file's name without .safetensors)"),
                               model: str | None = MODEL_QUERY) -> LoraCard:
        """Upload one adapter (multipart ``file``), kept once it reads and fits the model."""
        state = _uploads_on(request)
        name = name if name is not None else Path(file.filename or "").name.removesuffix(".safetensors")
        data = await file.read(state.config.max_lora_upload_bytes + 1)
        if len(data) > state.config.max_lora_upload_bytes:
            raise BodyReadError(413, "request_too_large", f"the adapter file exceeds "
                                f"{state.config.max_lora_upload_bytes} bytes (--max-lora-upload-mb)")
        return LoraCard(**await asyncio.to_thread(state.backend.add_lora, name, data, state.engine_model(model)))

    @router.put("/loras/{name}", response_model=LoraCard, status_code=201, responses=UPLOAD_ERRORS)
    async def upload_lora(name: str, request: Request, model: str | None = MODEL_QUERY) -> LoraCard:
        """Keep the body (one adapter's .safetensors file) as NAME, once it reads and fits the model."""
        state = _uploads_on(request)
        data = await request.body()
        return LoraCard(**await asyncio.to_thread(state.backend.add_lora, name, data, state.engine_model(model)))

    @router.delete("/loras/{name}", response_model=LoraDeleted,
                   responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def delete_lora(name: str, request: Request, model: str | None = MODEL_QUERY) -> LoraDeleted:
        """Remove an uploaded adapter; requests already running with it finish with their copy."""
        state = _uploads_on(request)
        await asyncio.to_thread(state.backend.delete_lora, name, state.engine_model(model))
        return LoraDeleted(name=name)

    @router.get("/stats", response_model=ServerStats)
    async def server_stats(request: Request) -> ServerStats:
        """Live queue depth, batch size and throughput (what the playground's panel shows)."""
        state = get_state(request)
        stats = state.backend.stats()
        return ServerStats(model=state.model_id, ready=state.ready, draining=state.draining,
                           queue_depth=stats.num_waiting, running=stats.num_running,
                           last_batch_requests=stats.last_batch_requests, last_batch_rows=stats.last_batch_rows,
                           last_step_s=stats.last_step_s, steps_total=stats.steps_total,
                           images_per_min=state.metrics.images_per_minute(), active_requests=len(state.jobs),
                           paused=stats.num_paused, refused_total=stats.refused_total,
                           dropped_total=stats.dropped_total, preempted_total=stats.preempted_total,
                           resumed_total=stats.resumed_total)

    return router


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness: the process answers."""
        return HealthResponse(status="ok")

    @router.get("/ready", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def ready(request: Request):
        """Readiness: the model is loaded, warm, and the server is not draining."""
        state = get_state(request)
        if state.draining:
            return error_json(503, "the server is shutting down", None, "shutting_down")
        if state.warmup_error is not None:
            return error_json(503, state.warmup_error + "; check the server log", None, "warmup_failed")
        if not state.ready:
            return error_json(503, "the model is warming up; retry in a few seconds", None, "not_ready")
        return HealthResponse(status="ready")

    @router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this server."""
        state = get_state(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_playground_html())

    return router


def _dashboard_router() -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(resources.files("glideserve.server").joinpath("static/dashboard.html")
                            .read_text(encoding="utf-8"))

    @router.get("/v1/dashboard", dependencies=[Depends(require_api_key)])
    async def dashboard_data(request: Request, since: float = Query(0.0, ge=0, description="only samples after "
                                                                    "this unix time")) -> dict:
        """The live dashboard's samples (the last 10 minutes at most), read from the /metrics registry."""
        state = get_state(request)
        return {"model": state.model_id, "samples": state.dashboard.since(since)}

    return router


def _playground_html() -> str:
    return resources.files("glideserve.server").joinpath("static/index.html").read_text(encoding="utf-8")


__all__ = ["create_app", "ServerConfig"]
