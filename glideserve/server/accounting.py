"""Counting every HTTP answer once: per route, status and error code.

``glideserve_requests_total{status}`` (in ServerMetrics) counts the outcome of each
generation request; the metrics here count the HTTP layer itself, for every route:
``glideserve_http_responses_total{route,status,code}`` gets exactly one increment
per request the server read the headers of (or refused at connect), including the
answers no route handler produced (413 decided from Content-Length, 408 timeouts,
503 connection limit, 400 for malformed HTTP) and requests whose client went away
before any answer (status 499, code ``client_disconnected``).
"""

from __future__ import annotations

import json
import logging
import re

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Error bodies are small envelopes; a larger one is not parsed for its code.
MAX_ENVELOPE_BYTES = 16 * 1024
UNMATCHED_ROUTE = "unmatched"
CONNECTION_ROUTE = "connection"  # answers sent before a request was read (connection limit, header timeout)
CLIENT_CLOSED_STATUS = 499
TIMEOUT_KINDS = ("header", "body", "write")


class HttpMetrics:
    """The HTTP layer's metrics, registered in the app's registry.

    ``responses`` is ``glideserve_http_responses_total{route,status,code}`` where
    ``route`` is the matched route template (bounded), ``code`` the error envelope's
    code or ``ok``. ``open_connections`` is a gauge of TCP connections held now,
    ``connections`` counts accepted ones, and ``connection_timeouts{kind}`` counts
    connections closed for a header, body or write timeout.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.responses = Counter("glideserve_http_responses", "HTTP answers by route, status and error code",
                                 ["route", "status", "code"], registry=registry)
        self.open_connections = Gauge("glideserve_open_connections", "TCP connections open now", registry=registry)
        self.connections = Counter("glideserve_connections", "TCP connections accepted", registry=registry)
        self.connection_timeouts = Counter("glideserve_connection_timeouts",
                                           "Connections closed because the client was too slow, by phase",
                                           ["kind"], registry=registry)
        for kind in TIMEOUT_KINDS:
            self.connection_timeouts.labels(kind=kind)

    def count_response(self, route: str, status: int, code: str) -> None:
        self.responses.labels(route=route, status=str(status), code=code).inc()


class RouteLabels:
    """The route template a request was, or would have been, served by.

    Starlette records the matched route in the scope; answers given before routing
    (a 413 from Content-Length, a 405) are matched here against the templates of
    the app's OpenAPI schema. Anything else is ``unmatched``, which keeps the
    label's values bounded whatever paths clients send.
    """

    def __init__(self):
        self._templates: list[tuple[re.Pattern, str]] | None = None

    def __call__(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if path is not None:
            return path
        if self._templates is None:
            app = scope.get("app")
            paths = app.openapi().get("paths", {}) if hasattr(app, "openapi") else {}
            # Literal templates first, so /v1/images/generations beats /v1/images/{image_id}.
            ordered = sorted(paths, key=lambda template: ("{" in template, template))
            self._templates = [(compile_path(template)[0], template) for template in ordered]
        for pattern, template in self._templates:
            if pattern.match(scope.get("path", "")):
                return template
        return UNMATCHED_ROUTE


def _envelope_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return code if isinstance(code, str) and code else "unknown"


class AccountingMiddleware:
    """Outermost ASGI layer: one ``count_response`` per HTTP request, just before the
    last byte of the answer leaves, so a client that reads the answer and then
    scrapes ``/metrics`` always sees it counted."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics
        self.route = RouteLabels()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        error_body = bytearray()
        counted = False

        def count(final_status: int, code: str) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.count_response(self.route(scope), final_status, code)

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status is not None:
                if status >= 400 and len(error_body) < MAX_ENVELOPE_BYTES:
                    error_body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    count(status, "ok" if status < 400 else _envelope_code(bytes(error_body)))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:
                # No complete answer: the client went away, or the app failed mid-response.
                if status is None or status < 400:
                    count(CLIENT_CLOSED_STATUS, "client_disconnected")
                else:
                    count(status, _envelope_code(bytes(error_body)))


class RedactImageIds(logging.Filter):
    """Replaces image ids in log records (uvicorn's access log) with ``<redacted>``.

    An image id is a bearer capability: whoever reads the log could fetch the image.
    """

    PATTERN = re.compile(r"img_[0-9a-fA-F]{8,}")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub("<redacted>", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        elif isinstance(record.msg, str):
            record.msg = self.PATTERN.sub("<redacted>", record.msg)
        return True


def redact_access_log(logger_name: str = "uvicorn.access") -> None:
    """Install RedactImageIds on ``logger_name`` once (create_app may run many times)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactImageIds) for f in logger.filters):
        logger.addFilter(RedactImageIds())
