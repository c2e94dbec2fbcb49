"""HTTP errors and the handlers that turn every failure into OpenAI's error envelope.

Anything the client did wrong becomes a 4xx naming the field; only a genuine bug in
the server becomes a 500, logged with its traceback and answered with a clean
envelope that does not leak internals.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glideserve.errors import EngineStoppedError, GlideServeError, QueueFullError
from glideserve.server.protocol import error_response_body
from glideserve.server.validation import parse_content_length

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
DRAIN_LIMIT_BYTES = 1024 * 1024
# A draining instance will not serve again; this is when a retry (through a load
# balancer) is likely to reach a replacement.
SHUTDOWN_RETRY_AFTER_S = 5


class AuthenticationError(GlideServeError):
    """The request lacks the server's bearer API key, or carries a different one."""

    http_status = 401
    code = "invalid_api_key"


class NotFoundError(GlideServeError):
    """The addressed resource (an image, a request) does not exist or has expired."""

    http_status = 404
    code = "not_found"


class RequestIdConflictError(GlideServeError):
    """A client-chosen request id is already used by a request in flight."""

    http_status = 409
    code = "duplicate_request_id"


class GenerationFailedError(GlideServeError):
    """The engine failed while producing an image: a server-side fault, not the client's."""

    http_status = 500
    code = "generation_failed"


class DrainTimeoutError(GlideServeError):
    """The server shut down before this admitted request finished (``--drain-timeout``)."""

    http_status = 503
    code = "drain_timeout"


class ServerNotReadyError(GlideServeError):
    """The server is warming up, draining or failed its warm-up; it cannot serve yet."""

    http_status = 503
    code = "not_ready"


HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
                    413: "request_too_large"}


class BodyReadError(StarletteHTTPException):
    """Raised from ``receive`` while the body is read (too large, too slow); FastAPI
    passes HTTPExceptions from the body read through unchanged, so it reaches the
    handler with its own status and ``code``. ``close`` answers with
    ``Connection: close`` instead of reading the rest of the body after the answer."""

    def __init__(self, status: int, code: str, message: str, close: bool = False):
        super().__init__(status, message, headers={"Connection": "close"} if close else None)
        self.code = code


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_response_body(status, message, param, code), status_code=status, headers=headers)


def is_generation(scope: Scope) -> bool:
    """Whether a request counts in ``glideserve_requests_total`` (a generation outcome)."""
    return scope.get("path") == GENERATIONS_PATH and scope.get("method") == "POST"


def _count(request: Request, code: str) -> None:
    if is_generation(request.scope):
        request.app.state.server.metrics.count_request(code)


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    param = _validation_param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON; send a JSON object with Content-Type: application/json"
    if kind == "extra_forbidden":
        return f"unknown field {param!r}; remove it (see GET /openapi.json for the accepted fields)"
    message = err.get("msg", "invalid value")
    if param is None:
        return f'the request body must be a JSON object such as {{"prompt": "a red circle"}} ({message})'
    return f"{param}: {message}"


def _protocol_headers(request: Request, exc: GlideServeError) -> dict[str, str]:
    """Headers HTTP asks for with some answers: the auth scheme with a 401 (RFC 9110
    section 11.6.1) and when to come back with a 503 from a draining server."""
    if isinstance(exc, AuthenticationError):
        return {"WWW-Authenticate": 'Bearer realm="glideserve"'}
    if isinstance(exc, (EngineStoppedError, DrainTimeoutError)):
        return {"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}
    return {}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type the app can meet to an envelope with the right status."""

    @app.exception_handler(GlideServeError)
    async def _glideserve_error(request: Request, exc: GlideServeError) -> JSONResponse:
        _count(request, exc.code)
        headers = None
        if isinstance(exc, QueueFullError):
            headers = {"Retry-After": str(request.app.state.server.retry_after_s())}
        elif getattr(exc, "retry_after_s", None) is not None:
            # Retry-After takes whole seconds; round up so a client never retries too early.
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        if exc.http_status >= 500:
            # A 503 (draining, a request dropped for its deadline) is load doing what it promises, not a fault.
            level = logging.INFO if exc.http_status == 503 else logging.ERROR
            log.log(level, "request %s failed: %s", request.url.path, exc.message)
        headers = {**(headers or {}), **_protocol_headers(request, exc)}
        return error_json(exc.http_status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        _count(request, "invalid_request")
        return error_json(400, _validation_message(first), _validation_param(tuple(first.get("loc", ()))),
                          "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, code = exc.status_code, HTTP_ERROR_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else "request rejected"
        if isinstance(exc, BodyReadError):
            code = exc.code
        elif isinstance(exc.__cause__, ClientDisconnect):
            # The client closed the connection while sending the body: nobody will read
            # this answer, but the request is still counted under its real reason.
            status, code, message = 499, "client_disconnected", "the client closed the connection mid-body"
        elif status == 400:
            # FastAPI's "There was an error parsing the body": bytes that are not UTF-8 JSON.
            message = "the request body could not be decoded; send UTF-8 JSON with Content-Type: application/json"
        elif status == 404:
            message = f"no route {request.method} {request.url.path}; see GET /openapi.json"
        _count(request, code)
        return error_json(status, message, None, code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        _count(request, "server_error")
        return error_json(500, "internal server error; the server logged the details", None, "server_error")


LORA_UPLOAD_PREFIX = "/v1/loras/"
LORA_FORM_PATH = "/v1/loras"
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def is_lora_upload(scope: Scope) -> bool:
    """``PUT /v1/loras/{name}`` (raw body) or ``POST /v1/loras`` (multipart)."""
    method, path = scope.get("method"), scope.get("path", "")
    return (method == "PUT" and path.startswith(LORA_UPLOAD_PREFIX)) or (method == "POST" and path == LORA_FORM_PATH)


DATASET_UPLOAD_PATH = "/v1/files"


def is_dataset_upload(scope: Scope) -> bool:
    """``POST /v1/files``: a fine-tuning dataset zip (multipart)."""
    return scope.get("method") == "POST" and scope.get("path", "") == DATASET_UPLOAD_PATH


class BodySizeLimitMiddleware:
    """Rejects request bodies over ``max_bytes`` with 413, by header and while streaming.

    Checking ``Content-Length`` up front answers honest clients without reading the
    body; counting received chunks also stops chunked uploads that lie or omit it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None,
                 dataset_max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes  # PUT /v1/loras/{name}, POST /v1/loras: a whole adapter file
        self.dataset_max_bytes = dataset_max_bytes  # POST /v1/files: a fine-tuning dataset zip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self.upload_max_bytes is not None and is_lora_upload(scope)
        limit = self.max_bytes
        if upload:  # a multipart upload (POST) carries its boundaries and part headers around the file
            limit = self.upload_max_bytes + (MULTIPART_OVERHEAD_BYTES if scope.get("method") == "POST" else 0)
        too_large = (f"the adapter file exceeds {limit} bytes (--max-lora-upload-mb)" if upload else
                     f"the request body exceeds {limit} bytes; shorten the prompt or split the request")
        if self.dataset_max_bytes is not None and is_dataset_upload(scope):
            limit = self.dataset_max_bytes + MULTIPART_OVERHEAD_BYTES
            too_large = f"the dataset zip exceeds {self.dataset_max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            length = parse_content_length(value) if name == b"content-length" else None
            if length is not None and length > limit:
                if is_generation(scope):
                    scope["app"].state.server.metrics.count_request("request_too_large")
                # A small body is cheaper to read and discard than a reset connection, which
                # can lose the 413 before the client reads it; a huge one is not read at all.
                close = {"Connection": "close"} if length > DRAIN_LIMIT_BYTES else None
                response = error_json(413, too_large, None, "request_too_large", close)
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyReadError(413, "request_too_large", too_large)
            return message

        await self.app(scope, limited_receive, send)
