"""Server configuration and the per-app state the routes share."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from glideserve.errors import ModelLoadError
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.params import MAX_SLO_MS, GenerationParams
from glideserve.server.accounting import HttpMetrics
from glideserve.server.backend import Backend
from glideserve.server.limits import HttpLimits, check_public_url
from glideserve.server.errors import AuthenticationError
from glideserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from glideserve.server.images import GenerationJob

log = logging.getLogger(__name__)
# After the drain timeout, how long the aborted requests get to write their 503s.
DRAIN_ANSWER_GRACE_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings; the engine's own limits live in its EngineConfig.

    ``public_url`` (e.g. ``https://images.example.com``) is the base of the image URLs
    the server hands out; without it they are relative (``/v1/images/...``). The
    client's ``Host`` header is never used. ``docs`` serves ``/docs`` and ``/redoc``
    (their pages load scripts from a public CDN). ``limits`` bounds connections,
    timeouts and the shutdown drain (see HttpLimits).

    ``model_id`` is the name clients pass as ``model`` (default: the backend's spec
    name). ``max_queue`` bounds engine requests waiting for a slot: a request that
    would push the queue past it gets 429. ``api_key`` (None = open) is required as
    ``Authorization: Bearer <key>`` on ``/v1`` routes. Images returned by URL are kept
    ``image_ttl_s`` seconds, at most ``max_stored_images`` of them. ``warmup`` runs
    one tiny generation at start-up before ``/ready`` turns ready. ``default_slo_ms``
    is the SLO of requests that carry no ``slo_ms`` (None: they are best effort).
    ``lora_uploads`` allows ``PUT``/``DELETE /v1/loras/{name}`` (off by default: an upload
    writes to the server's LoRA directory), with bodies up to ``max_lora_upload_bytes``.
    ``dashboard`` serves the live dashboard (``/dashboard`` and ``GET /v1/dashboard``).
    """

    model_id: str | None = None
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 64 * 1024
    public_url: str | None = None
    docs: bool = False
    limits: HttpLimits = HttpLimits()
    image_ttl_s: float = 600.0
    max_stored_images: int = 256
    warmup: bool = True
    default_slo_ms: float | None = None
    lora_uploads: bool = False
    max_lora_upload_bytes: int = 64 * 1024 * 1024
    dashboard: bool = True

    def __post_init__(self):
        if self.public_url is not None:
            object.__setattr__(self, "public_url", check_public_url(self.public_url))
        for name in ("max_queue", "max_body_bytes", "max_stored_images", "max_lora_upload_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1")
        if self.image_ttl_s <= 0:
            raise ValueError("ServerConfig.image_ttl_s must be > 0")
        if self.default_slo_ms is not None and not 0 < self.default_slo_ms <= MAX_SLO_MS:
            raise ValueError(f"the default SLO must be in (0, {MAX_SLO_MS:.0f}] ms, got {self.default_slo_ms!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty; omit it to run without authentication")


class ImageStore:
    """PNG bytes served at ``GET /v1/images/{id}``, each for ``ttl_s`` seconds.

    At most ``capacity`` images are kept; storing one more evicts the oldest. Ids
    are 128-bit random tokens, so an image URL works as a bearer capability.
    """

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def put(self, png: bytes) -> str:
        self._expire()
        image_id = "img_" + secrets.token_hex(16)
        self._images[image_id] = (self._clock() + self.ttl_s, png)
        while len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        self._expire()
        entry = self._images.get(image_id)
        return None if entry is None else entry[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._images:
            image_id, (expires, _) = next(iter(self._images.items()))
            if expires > now:
                break
            del self._images[image_id]


CASCADE_MODEL_NAME = "cascade"  # what a client names to run the cascade (as does naming no model)


def _cascade_of(backend):
    """The backend if it serves a cascade, else None (the cascade module loads only when it does)."""
    import sys

    module = sys.modules.get("glideserve.cascade.serving")
    return backend if module is not None and isinstance(backend, module.CascadeBackend) else None


class ServerState:
    """Everything the routes share: backend, config, metrics, image store, jobs in flight.

    ``ready`` turns true after the warm-up generation; ``draining`` (set on SIGTERM
    or at shutdown) makes new generations fail with 503 while admitted ones finish.
    """

    def __init__(self, backend: Backend, config: ServerConfig, on_ready: Callable[[], None] | None = None,
                 http_metrics: HttpMetrics | None = None):
        self.backend = backend
        self.config = config
        self.model_id = config.model_id or backend.spec.name
        self.cascade = _cascade_of(backend)
        # A server that listened while it loaded already counts connections in ``http_metrics``.
        self.metrics = ServerMetrics(backend.stats, model_cards=self.model_cards,
                                     cascade=None if self.cascade is None else self.cascade.describe,
                                     registry=None if http_metrics is None else http_metrics.registry)
        self.http_metrics = http_metrics or HttpMetrics(self.metrics.registry)
        self._register_optional_metrics(backend)
        self.dashboard = None
        if config.dashboard:
            from glideserve.server.dashboard import DashboardHistory

            self.dashboard = DashboardHistory(self.metrics.registry, slo_ms=lambda: config.default_slo_ms)
        self.images = ImageStore(config.max_stored_images, config.image_ttl_s)
        self.jobs: dict[str, GenerationJob] = {}
        self.ready = False
        self.draining = False
        self.warmup_error: str | None = None
        self.created = int(time.time())
        self._on_ready = on_ready

    def _register_optional_metrics(self, backend) -> None:
        from glideserve.server.metrics import FineTuningCollector, LoraCollector

        self.metrics.registry.register(LoraCollector(self.model_cards,
                                                    lambda name: backend.loras(self.engine_model(name))))
        service = getattr(backend, "fine_tuning", None)
        if service is not None:
            self.metrics.registry.register(FineTuningCollector(service))

    def begin_drain(self) -> None:
        self.draining = True

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> int:
        """Stop admitting, wait up to ``timeout_s`` for the admitted requests, then fail
        what is left with 503 ``drain_timeout``; returns how many were failed.

        The failed requests are aborted in the engine (freed at its next step) and
        answered through their own responses, so each is counted once like any other.
        """
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.jobs and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        late = list(self.jobs.values())
        if late:
            log.warning("drain timeout (%.0f s): failing %d unfinished request(s)", timeout_s, len(late))
            for job in late:
                await job.abort(reason="drain_timeout")
            grace = loop.time() + DRAIN_ANSWER_GRACE_S
            while self.jobs and loop.time() < grace:  # let their answers be written
                await asyncio.sleep(poll_s)
        return len(late)

    def model_cards(self) -> list[dict]:
        """The backend's models; a one-model server's card carries its configured ``model_id``."""
        cards = self.backend.model_cards()
        if len(cards) == 1:
            cards = [{**cards[0], "name": self.model_id}]
        return cards

    def engine_model(self, requested: str | None) -> str | None:
        """The backend's name for the model a request names (None: the default, or the cascade when
        one is served), or 404 ``model_not_found`` listing the served names."""
        if requested is None or (self.cascade is not None and requested == CASCADE_MODEL_NAME):
            return None
        cards = self.model_cards()
        if len(cards) == 1 and requested in (self.model_id, self.backend.spec.name):
            return None
        if len(cards) > 1 and any(card["name"] == requested for card in cards):
            return requested
        names = ", ".join(repr(card["name"]) for card in cards)
        raise ModelLoadError(f"model {requested!r} is not served here; choose one of {names} (see GET /v1/models)",
                             "model")

    def check_api_key(self, authorization: str | None) -> None:
        expected = self.config.api_key
        if expected is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise AuthenticationError(
                "missing or wrong API key; send the server's key as 'Authorization: Bearer <key>'")

    def retry_after_s(self) -> int:
        """A rough wait before retrying a full queue: one default-length request's steps."""
        stats = self.backend.stats()
        estimate = stats.last_step_s * self.backend.spec.default_steps
        return int(min(60, max(1, math.ceil(estimate))))

    async def warm_up(self) -> None:
        """Run one 1-step generation at the default size, then report ready."""
        params = GenerationParams(prompt="warm-up", num_inference_steps=1, seed=0)
        try:
            stream = await self.backend.add_request(params, request_id="warmup-" + secrets.token_hex(4))
            async for event in stream:
                if isinstance(event, RequestFailed):
                    raise RuntimeError(f"{event.reason}: {event.message}")
                if isinstance(event, GenerationResult):
                    break
        except Exception as exc:  # reported through /ready; the server stays up to say why
            self.warmup_error = f"warm-up generation failed: {exc}"
            log.error("%s", self.warmup_error)
            return
        self.mark_ready()

    def mark_ready(self) -> None:
        self.ready = True
        if self._on_ready is not None:
            self._on_ready()
