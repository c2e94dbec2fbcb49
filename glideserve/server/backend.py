"""The interface the HTTP server needs from whatever generates the images.

``glideserve.AsyncEngine`` implements it; so can any other system (a baseline that
batches whole requests, say) that should be served, measured and compared behind
the same API.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Protocol, runtime_checkable

from glideserve.models.spec import ModelSpec
from glideserve.outputs import EngineEvent
from glideserve.params import GenerationParams


@runtime_checkable
class RequestStream(Protocol):
    """Events of one admitted request, ending after a GenerationResult or RequestFailed.

    ``params`` are the resolved parameters (seed, size and steps filled in).
    """

    request_id: str
    params: GenerationParams

    def __aiter__(self) -> AsyncIterator[EngineEvent]: ...


@runtime_checkable
class Backend(Protocol):
    """An asynchronous image generator the server can drive.

    ``add_request`` validates and admits a request or raises a GlideServeError
    (InvalidRequestError, QueueFullError, EngineStoppedError) before any event;
    ``abort`` stops a request at its next step and ends its stream with
    ``RequestFailed(reason="aborted")``; ``stats`` returns an object with
    ``num_waiting``, ``num_running``, ``steps_total``, ``last_step_s``,
    ``last_batch_rows`` and ``last_batch_requests``; step listeners receive an
    object with ``duration_s``, ``num_requests`` and ``num_rows`` after each step;
    ``shutdown(drain=True)`` stops admitting and finishes every admitted request;
    ``model_cards()`` describes the models it serves (dicts with ``name``, ``loaded``,
    ``family``, ``default_size``, ``default_steps``), the default first; a request's
    ``params.model`` names one of them (None: the default); ``loras(model)`` lists the LoRA
    adapters it can serve with a model (dicts with ``name``, ``resident``, ``rank``,
    ``target_modules``), empty when it serves none; ``add_lora`` keeps an uploaded adapter
    once it is validated and ``delete_lora`` removes one (both blocking: call them off the
    event loop).
    """

    spec: ModelSpec

    async def start(self) -> None: ...

    async def add_request(self, params: GenerationParams, request_id: str | None = None) -> RequestStream: ...

    async def abort(self, request_id: str) -> bool: ...

    def stats(self): ...

    def add_step_listener(self, fn: Callable[[object], None]) -> None: ...

    def model_cards(self) -> list[dict]: ...

    def loras(self, model: str | None = None) -> list[dict]: ...

    def add_lora(self, name: str, data: bytes, model: str | None = None) -> dict: ...

    def delete_lora(self, name: str, model: str | None = None) -> None: ...

    async def shutdown(self, drain: bool = True) -> None: ...
