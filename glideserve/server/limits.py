"""Bounds on what one client can hold: connections, time to send a request, time to
read an answer, and how long a shutdown waits for admitted work."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, fields
from typing import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glideserve.server.errors import BodyReadError

PUBLIC_URL_PATTERN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/%]*)?")


@dataclass(frozen=True)
class HttpLimits:
    """Connection-level limits of the HTTP server (every value in seconds unless noted).

    ``header_timeout_s``: from the connection (on a keep-alive connection: from the
    first byte of the next request) to the end of the request headers; a client that
    has started a request then gets 408, a silent one is closed.
    ``body_timeout_s``: from the end of the headers to the end of the body; 408
    ``body_timeout`` and the connection is closed. ``keep_alive_timeout_s``: an idle
    keep-alive connection is closed after it. ``write_timeout_s``: a client that
    reads none of an answer for this long is disconnected. ``max_connections``
    (a count): connections beyond it get 503 ``too_many_connections`` and are
    closed. ``drain_timeout_s``: after SIGTERM, admitted requests still unfinished
    after it fail with 503 ``drain_timeout``.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    write_timeout_s: float = 60.0
    max_connections: int = 512
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"HttpLimits.{field.name} must be > 0, got {value!r}")


def check_public_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless it is a plain http(s) base URL."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if not PUBLIC_URL_PATTERN.fullmatch(url) or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"--public-url must be an http(s) base URL such as https://images.example.com, got {url!r}")
    return url


class BodyTimeoutMiddleware:
    """Bounds the time from the end of the headers to the end of the body.

    A client that stops sending mid-body gets 408 ``body_timeout`` (the handler
    never runs) and the connection is closed. Only ``receive`` calls made while the
    body is incomplete are bounded; later ones (waiting for a disconnect while an
    image is generated) are not.
    """

    def __init__(self, app: ASGIApp, timeout_s: float, on_timeout: Callable[[], None] = lambda: None):
        self.app = app
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                body_done = True
                self.on_timeout()
                raise BodyReadError(408, "body_timeout", f"the request body did not arrive within "
                                    f"{self.timeout_s:g} s; send the whole body at once", close=True) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, bounded_receive, send)
