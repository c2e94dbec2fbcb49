"""Errors a user of glideserve can act on.

Every error raised for something the caller did (bad input, missing model, full
queue) derives from :class:`GlideServeError` and carries a message that says what to
do. The CLI prints the message without a traceback; the server maps ``http_status``
and ``code`` onto an OpenAI-style error envelope.
"""

from __future__ import annotations


class GlideServeError(Exception):
    """Base class: ``message`` is meant for the end user; ``param`` names the bad field."""

    http_status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Errors cross process boundaries (cluster replicas to the ingress); pickle every attribute,
        # not the constructor's arguments, which subclasses extend.
        return _rebuild_error, (type(self), dict(self.__dict__))


def _rebuild_error(cls: type, attributes: dict) -> GlideServeError:
    error = cls.__new__(cls)
    Exception.__init__(error, attributes.get("message", ""))
    error.__dict__.update(attributes)
    return error


class InvalidRequestError(GlideServeError):
    """A generation request has a parameter out of range or of the wrong kind."""


class ModelLoadError(GlideServeError):
    """A model path or name cannot be loaded (missing, not a diffusers model, unsafe file)."""

    http_status = 404
    code = "model_not_found"


class LoraNotFoundError(GlideServeError):
    """A request names a LoRA adapter the server does not have."""

    http_status = 404
    code = "lora_not_found"


class LoraExistsError(GlideServeError):
    """An upload names a LoRA adapter the server already has."""

    http_status = 409
    code = "lora_exists"


class LoraUploadsDisabledError(GlideServeError):
    """The server was started without ``--lora-uploads``."""

    http_status = 403
    code = "lora_uploads_disabled"


class QueueFullError(GlideServeError):
    """The engine's waiting queue is at its bound; retry later."""

    http_status = 429
    code = "queue_full"


class SLOUnattainableError(GlideServeError):
    """Refused at admission: by the latency profile, the request would finish after its deadline.

    ``predicted_s`` is the predicted latency from arrival to image; ``retry_after_s``
    a wait after which the same request is predicted to fit.
    """

    http_status = 429
    code = "slo_unattainable"

    def __init__(self, message: str, predicted_s: float, retry_after_s: float, param: str | None = "slo_ms"):
        super().__init__(message, param)
        self.predicted_s = predicted_s
        self.retry_after_s = retry_after_s


class DeadlineExceededError(GlideServeError):
    """An admitted request was dropped: it was predicted to miss its deadline by more than the tolerance."""

    http_status = 503
    code = "deadline_exceeded"


class EngineStoppedError(GlideServeError):
    """The engine is shutting down and admits no new requests."""

    http_status = 503
    code = "shutting_down"


class RequestAbortedError(GlideServeError):
    """The request was cancelled before it finished."""

    http_status = 499
    code = "cancelled"
