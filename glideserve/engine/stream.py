"""RequestStream: one request's events, delivered from the engine thread to an asyncio caller."""

from __future__ import annotations

import asyncio

from glideserve.outputs import EngineEvent, GenerationResult, RequestFailed
from glideserve.params import GenerationParams


class RequestStream:
    """Async iterator over one request's events; it ends after the result or failure.

    ``push`` may be called from any thread: events are handed to the event loop that
    created the stream. ``params`` are the resolved parameters (seed, size... filled).
    """

    def __init__(self, request_id: str, params: GenerationParams, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.params = params
        self._loop = loop
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._done = False

    def push(self, event: EngineEvent) -> None:
        """Deliver ``event`` from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the caller's event loop has closed: nobody is listening
            pass

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, (GenerationResult, RequestFailed)):
            self._done = True
        return event
