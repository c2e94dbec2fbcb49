"""Image routes: generation (plain or streamed as Server-Sent Events), cancellation, and
fetching images returned by URL."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.types import Receive, Scope, Send

from glideserve.errors import (DeadlineExceededError, EngineStoppedError, GlideServeError, InvalidRequestError,
                               QueueFullError, RequestAbortedError)
from glideserve.outputs import Escalated, GenerationResult, Loading, Queued, RequestFailed, StepProgress
from glideserve.params import GenerationParams
from glideserve.server.backend import RequestStream
from glideserve.server.errors import (GENERATIONS_PATH, DrainTimeoutError, GenerationFailedError, NotFoundError,
                                      RequestIdConflictError)
from glideserve.server.protocol import (CancelResponse, CascadeInfo, CompletedEvent, ErrorBody, ErrorResponse,
                                        ImageData, ImageGenerationRequest, ImagesResponse, ImageTimings, LoadingEvent,
                                        PartialImageEvent, ProgressEvent, ResponseTimings, StreamErrorEvent,
                                        error_response_body)
from glideserve.server.state import ServerState
from glideserve.server.validation import IMAGE_ID_PATTERN, REQUEST_ID_PATTERN

PREVIEW_SIDE = 256
_bearer = HTTPBearer(auto_error=False, description="required when the server runs with an API key")


def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def require_api_key(request: Request,
                          _credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    get_state(request).check_api_key(request.headers.get("authorization"))


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 429, 500, 503)}
router = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)
public_router = APIRouter(responses=_ERRORS)


class GenerationJob:
    """One API request: its ``n`` engine requests, their merged events, and cancellation.

    Image ``i`` runs as engine request ``f"{id}-{i}"``. ``events()`` yields
    ``(image_index, event)`` as they arrive from any image; ``abort()`` cancels every
    image that has not finished; ``close()`` also stops reading and unregisters the job.
    """

    def __init__(self, job_id: str, body: ImageGenerationRequest, state: ServerState):
        self.id = job_id
        self.body = body
        self.state = state
        self.arrival = time.monotonic()
        self.streams: list[RequestStream] = []
        self._finished: set[int] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self.abort_reason: str | None = None  # why the server aborted it; None: the client cancelled

    async def admit(self, params: list[GenerationParams]) -> None:
        """Admit every image or none: a rejection aborts the images already admitted."""
        try:
            for index, p in enumerate(params):
                self.streams.append(await self.state.backend.add_request(p, request_id=f"{self.id}-{index}"))
        except BaseException:
            await self.abort()
            raise
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                if isinstance(event, (GenerationResult, RequestFailed)):
                    self._finished.add(index)
                if isinstance(event, RequestFailed) and event.reason == "aborted" and self.abort_reason:
                    event = RequestFailed(event.request_id, self.abort_reason, event.message)
                self._queue.put_nowait((index, event))
        except Exception as exc:  # a broken stream fails its image instead of hanging the response
            self._finished.add(index)
            self._queue.put_nowait((index, RequestFailed(stream.request_id, "error", f"event stream failed: {exc}")))
        finally:
            self._queue.put_nowait((index, None))

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        open_streams = len(self.streams)
        while open_streams:
            index, event = await self._queue.get()
            if event is None:
                open_streams -= 1
            else:
                yield index, event

    async def abort(self, reason: str | None = None) -> None:
        """Cancel the unfinished images; ``reason`` (e.g. ``drain_timeout``) replaces
        ``aborted`` in their RequestFailed events when the server, not the client, gave up."""
        if reason is not None:
            self.abort_reason = reason
        for index, stream in enumerate(self.streams):
            if index not in self._finished:
                await self.state.backend.abort(stream.request_id)

    async def close(self) -> None:
        try:
            await self.abort()
        finally:
            for task in self._pumps:
                task.cancel()
            self.state.jobs.pop(self.id, None)

    @property
    def slo_ms(self) -> float | None:
        """The SLO the images were admitted with: the request's own, else the server default."""
        return self.streams[0].params.slo_ms

    def size(self) -> str:
        params = self.streams[0].params
        return f"{params.width}x{params.height}"

    def elapsed_s(self) -> float:
        return time.monotonic() - self.arrival


class EventStreamResponse(StreamingResponse):
    """SSE response that always finalizes its event generator, which aborts unfinished images.

    Whether the client disconnects or the response completes, the generator's
    ``finally`` runs right away instead of whenever it is garbage-collected.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _sse(event) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def _png(image: Image.Image, max_side: int | None = None) -> bytes:
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _timings(result: GenerationResult) -> ImageTimings:
    return ImageTimings(**result.timings.as_dict())


def _failure(event: RequestFailed) -> Exception:
    if isinstance(event.error, GlideServeError):  # refused after acceptance (e.g. once its model had loaded)
        return event.error
    if event.reason == DrainTimeoutError.code:
        return DrainTimeoutError("the server shut down before the image was finished (drain timeout); retry "
                                 "on another instance")
    if event.reason == "aborted":
        return RequestAbortedError(f"the request was cancelled: {event.message}".rstrip(": "))
    if event.reason == DeadlineExceededError.code:
        return DeadlineExceededError(event.message)
    return GenerationFailedError(f"image generation failed on the server: {event.message}")


def _lora(value) -> object:
    if value is None or isinstance(value, str):
        return value or ()
    return [{"name": ref.name, "scale": ref.scale} for ref in value]


def _params(body: ImageGenerationRequest, default_slo_ms: float | None, model: str | None) -> list[GenerationParams]:
    height, width = body.height_width()
    base_seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    slo_ms = body.slo_ms if body.slo_ms is not None else default_slo_ms
    return [GenerationParams(prompt=body.prompt, negative_prompt=body.negative_prompt,
                             num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                             seed=seed, height=height, width=width, sampler=body.sampler,
                             partial_images=body.partial_images if body.stream else 0,
                             slo_ms=slo_ms, priority=body.priority or 0, cache=body.cache,
                             latent_aware=body.latent_aware, lora=_lora(body.lora), model=model)
            for seed in body.seeds(base_seed)]


def _route(state: ServerState, body: ImageGenerationRequest) -> str | None:
    """The engine model a request runs on (None: the default, which is the cascade when one is served)."""
    model = state.engine_model(body.model)
    if body.cascade is None:
        return model
    if state.cascade is None:
        raise InvalidRequestError("this server runs no cascade; drop `cascade` or start it with --cascade",
                                  "cascade")
    if body.cascade and model is not None:
        raise InvalidRequestError(f"cascade=true runs the cascade, but model {body.model!r} names one of its "
                                  "models; name no model (or 'cascade') to run the cascade", "cascade")
    return model if body.cascade or model is not None else state.cascade.config.heavy


def _served(state: ServerState, result: GenerationResult) -> dict:
    """``served_by`` and ``cascade`` of an image's response."""
    verdict = None if result.cascade is None else CascadeInfo(**result.cascade.as_dict())
    return {"served_by": result.params.model or state.model_id, "cascade": verdict}


@router.post(GENERATIONS_PATH, response_model=ImagesResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true a stream of image_generation.* events"}})
async def create_images(body: ImageGenerationRequest, request: Request,
                        x_request_id: str | None = Header(default=None, pattern=REQUEST_ID_PATTERN,
                                                          description="optional id, to cancel with DELETE")):
    """Generate ``n`` images; ``stream=true`` sends per-step progress and each image as it finishes."""
    state = get_state(request)
    if state.draining:
        raise EngineStoppedError("the server is shutting down and admits no new requests; retry on another instance")
    params = _params(body, state.config.default_slo_ms, _route(state, body))
    waiting = state.backend.stats().num_waiting
    if waiting + body.n > state.config.max_queue:
        raise QueueFullError(f"the queue is full ({waiting} images waiting, limit {state.config.max_queue}); "
                             "retry after the Retry-After delay")
    job_id = x_request_id or "req_" + secrets.token_hex(12)
    if job_id in state.jobs:
        raise RequestIdConflictError(f"request id {job_id!r} is already in flight; choose another", "X-Request-Id")
    job = GenerationJob(job_id, body, state)
    state.jobs[job_id] = job
    try:
        await job.admit(params)
    except InvalidRequestError as exc:
        state.jobs.pop(job_id, None)
        if exc.param in ("height", "width"):
            raise InvalidRequestError(f"size {body.size!r}: {exc.message}", "size") from exc
        raise
    except BaseException:
        state.jobs.pop(job_id, None)
        raise
    headers = {"X-Request-Id": job_id}
    if body.stream:
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return EventStreamResponse(_event_stream(job), headers=headers)
    response = await _collect(job, request)
    return Response(response.model_dump_json(), media_type="application/json", headers=headers)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(job: GenerationJob, request: Request) -> ImagesResponse:
    results: dict[int, GenerationResult] = {}

    async def consume() -> RequestFailed | None:
        async for index, event in job.events():
            if isinstance(event, RequestFailed):
                return event
            if isinstance(event, GenerationResult):
                results[index] = event
        return None

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer not in done:
            raise RequestAbortedError("the client disconnected before the images were ready")
        failure = consumer.result()
        if failure is not None:
            raise _failure(failure)
    finally:
        consumer.cancel()
        watcher.cancel()
        await job.close()
    total_s = job.elapsed_s()
    data = []
    for index in range(len(job.streams)):
        result = results[index]
        png = await asyncio.to_thread(_png, result.image)
        job.state.metrics.observe_image(result.timings)
        if job.body.response_format == "url":
            url = _image_url(request, job.state.images.put(png))
            data.append(ImageData(url=url, seed=result.params.seed, **_served(job.state, result)))
        else:
            data.append(ImageData(b64_json=base64.b64encode(png).decode(), seed=result.params.seed,
                                  **_served(job.state, result)))
    met = job.state.metrics.observe_completed(total_s, job.slo_ms)
    timings = ResponseTimings(total_s=round(total_s, 6), slo_ms=job.slo_ms, slo_met=met,
                              images=[_timings(results[i]) for i in range(len(job.streams))])
    return ImagesResponse(created=int(time.time()), data=data, size=job.size(), timings=timings)


def _image_url(request: Request, image_id: str) -> str:
    # Never from the Host header: a client (or anyone who can set Host in front of a
    # proxy) would choose the host every later reader of the URL is sent to.
    path = request.scope.get("root_path", "") + request.app.url_path_for("get_image", image_id=image_id)
    public_url = get_state(request).config.public_url
    return path if public_url is None else public_url + path


async def _event_stream(job: GenerationJob) -> AsyncIterator[str]:
    metrics = job.state.metrics
    partial_sent = [0] * len(job.streams)
    size = job.size()
    outcome = "cancelled"  # unless the stream reaches its end: the client went away
    try:
        async for index, event in job.events():
            if isinstance(event, Loading):
                yield _sse(LoadingEvent(request_id=job.id, image_index=index, model=event.model,
                                        estimated_s=event.estimated_s))
            elif isinstance(event, Queued):
                total = job.streams[index].params.num_inference_steps
                yield _sse(ProgressEvent(request_id=job.id, image_index=index, step=0, total=total,
                                         queue_position=event.position))
            elif isinstance(event, StepProgress):
                yield _sse(ProgressEvent(request_id=job.id, image_index=index, step=event.step, total=event.total))
                if event.preview is not None:  # the engine spaces the requested previews over the steps
                    png = await asyncio.to_thread(_png, event.preview, PREVIEW_SIDE)
                    yield _sse(PartialImageEvent(b64_json=base64.b64encode(png).decode(), size=size,
                                                 partial_image_index=partial_sent[index], image_index=index,
                                                 step=event.step))
                    partial_sent[index] += 1
            elif isinstance(event, Escalated):  # the light model's image, while the heavy model works
                png = await asyncio.to_thread(_png, event.image, PREVIEW_SIDE)
                yield _sse(PartialImageEvent(b64_json=base64.b64encode(png).decode(), size=size,
                                             partial_image_index=partial_sent[index], image_index=index,
                                             step=0, cascade=CascadeInfo(**event.verdict.as_dict())))
                partial_sent[index] += 1
            elif isinstance(event, GenerationResult):
                png = await asyncio.to_thread(_png, event.image)
                metrics.observe_image(event.timings)
                yield _sse(CompletedEvent(b64_json=base64.b64encode(png).decode(), size=size, image_index=index,
                                          seed=event.params.seed, timings=_timings(event),
                                          **_served(job.state, event)))
            elif isinstance(event, RequestFailed):
                error = _failure(event)
                metrics.count_request(error.code)
                body = error_response_body(error.http_status, error.message, None, error.code)["error"]
                outcome = None
                yield _sse(StreamErrorEvent(error=ErrorBody(**body)))
                return
        outcome = None
        metrics.observe_completed(job.elapsed_s(), job.slo_ms)
    finally:
        if outcome is not None:
            metrics.count_request(outcome)
        with anyio.CancelScope(shield=True):
            await job.close()


@router.delete("/v1/requests/{request_id}", response_model=CancelResponse)
async def cancel_request(request: Request, request_id: str = Path(pattern=REQUEST_ID_PATTERN)) -> CancelResponse:
    """Cancel a generation in flight (its id is the ``X-Request-Id`` response header)."""
    job = get_state(request).jobs.get(request_id)
    if job is None:
        raise NotFoundError(f"no request {request_id!r} in flight; it may have finished already", "request_id")
    await job.abort()
    return CancelResponse(id=request_id, cancelled=True)


@public_router.get("/v1/images/{image_id}", name="get_image", response_class=Response,
                   responses={200: {"content": {"image/png": {}}}})
async def get_image(request: Request, image_id: str = Path(max_length=64)) -> Response:
    """A PNG returned with ``response_format="url"``; URLs expire (see the server's image TTL)."""
    # Anything that is not an id this server mints is simply unknown: a 404, like an expired id.
    png = get_state(request).images.get(image_id) if IMAGE_ID_PATTERN.fullmatch(image_id) else None
    if png is None:
        raise NotFoundError("the image does not exist or has expired; generate it again", "image_id")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

