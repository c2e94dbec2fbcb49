"""uvicorn's HTTP/1.1 protocol with bounds on what a slow or greedy client can hold.

uvicorn closes idle keep-alive connections, but a client that connects and says
nothing, sends half a header, or stops reading an answer keeps its connection
(and, for the last, a task) forever. The protocol here adds a header timeout, a
write timeout and a cap on open connections; the body timeout is enforced by
BodyTimeoutMiddleware (limits.py), where the answer can still be an ordinary 408.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from glideserve.server.accounting import CONNECTION_ROUTE, UNMATCHED_ROUTE, HttpMetrics
from glideserve.server.limits import HttpLimits
from glideserve.server.protocol import error_response_body

# A refused connection stays open this long after its 503 so the client can read it
# (closing with its request unread would reset the connection and lose the answer).
REJECT_LINGER_S = 1.0


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 error answer with the JSON envelope."""
    body = json.dumps(error_response_body(status, message, None, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class OpenConnections:
    """How many connections are open now, shared by every protocol instance of one server."""

    def __init__(self):
        self.count = 0


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header timeout, a write timeout and a connection cap.

    The header timer runs from the connection, or on a keep-alive connection from
    the first byte of the next request, until the request's headers are complete;
    on expiry a client that had started a request gets 408 ``header_timeout``, a
    silent new connection is just closed (an idle keep-alive connection is closed by
    uvicorn's keep-alive timeout instead, and is not counted). The write timer
    runs while the transport's buffer is over its high-water mark (the client is not
    reading); on expiry the connection is aborted. A connection beyond
    ``max_connections`` gets 503 ``too_many_connections`` and is closed. Subclasses
    made by ``guarded_protocol`` set ``limits``, ``metrics`` and ``open_connections``.
    """

    limits: HttpLimits
    metrics: HttpMetrics
    open_connections: OpenConnections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._rejected = False
        self._counted = True
        self.open_connections.count += 1
        self.metrics.connections.inc()
        self.metrics.open_connections.inc()
        if self.open_connections.count > self.limits.max_connections:
            self._reject()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.open_connections.count -= 1
            self.metrics.open_connections.dec()
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # the 503 is on its way; the request is not read
        super().data_received(data)
        self._update_header_timer()

    def _update_header_timer(self) -> None:
        """Decide, from what h11 has parsed, whether the connection is waiting for headers."""
        if self._request_started() or self.transport.is_closing():
            self._cancel_header_timer()
        elif self.conn.their_state is not h11.IDLE:
            # The rest of the body of a request already answered (say, a 413) is being read
            # and discarded: bounded too, from the first byte after the answer.
            if self._header_timer is None:
                self._arm_header_timer()
        elif self.conn.trailing_data[0]:
            if self._header_timer is None:  # the first bytes of the next request
                self._arm_header_timer()
        else:
            # Nothing of a next request: an idle keep-alive connection, which uvicorn's
            # keep-alive timer closes (receiving data cancelled it).
            self._cancel_header_timer()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._on_write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to malformed HTTP is plain text without a code.
        message = "the request is not valid HTTP/1.1 (malformed request line or headers, or headers too large)"
        self.metrics.count_response(UNMATCHED_ROUTE, 400, "bad_http_request")
        self.transport.write(raw_error(400, "Bad Request", message, "bad_http_request"))
        self.transport.close()

    def _request_started(self) -> bool:
        """Whether the headers of a request not yet answered have been received."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_timers(self) -> None:
        for timer in (getattr(self, "_header_timer", None), getattr(self, "_write_timer", None)):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._request_started():
            return
        if self.conn.their_state is not h11.IDLE:  # still sending the body of an answered request
            self.metrics.connection_timeouts.labels(kind="body").inc()
            self.transport.close()
            return
        self.metrics.connection_timeouts.labels(kind="header").inc()
        if self.conn.trailing_data[0]:  # part of a request: it gets an answer; a silent client does not
            message = (f"the request headers did not arrive within {self.limits.header_timeout_s:g} s; "
                       "send the whole request at once")
            self.metrics.count_response(CONNECTION_ROUTE, 408, "header_timeout")
            self.transport.write(raw_error(408, "Request Timeout", message, "header_timeout"))
        self.transport.close()

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self.metrics.connection_timeouts.labels(kind="write").inc()
            # close() would wait for the buffer to drain, which is what is not happening.
            self.transport.abort()

    def _reject(self) -> None:
        self._rejected = True
        message = (f"the server has {self.limits.max_connections} connections open, its limit; retry shortly "
                   "or reuse a keep-alive connection")
        self.metrics.count_response(CONNECTION_ROUTE, 503, "too_many_connections")
        self.transport.write(raw_error(503, "Service Unavailable", message, "too_many_connections"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REJECT_LINGER_S, self.transport.close)


def guarded_protocol(limits: HttpLimits, metrics: HttpMetrics) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class bound to one server's limits and metrics, for ``uvicorn.Config(http=...)``."""
    return type("GlideServeH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "metrics": metrics, "open_connections": OpenConnections()})
