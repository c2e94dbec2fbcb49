"""Pure parts of the server: request validation, error envelope, image store, metrics, config."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from glideserve.errors import GlideServeError, InvalidRequestError
from glideserve.outputs import RequestTimings
from glideserve.params import MAX_SEED
from glideserve.server import ServerConfig
from glideserve.server.metrics import ServerMetrics
from glideserve.server.protocol import ImageGenerationRequest, error_response_body
from glideserve.server.state import ImageStore


def error_fields(**body) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest(**body)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_defaults_follow_openai():
    request = ImageGenerationRequest(prompt="a cat")
    assert (request.n, request.response_format, request.stream, request.partial_images) == (1, "b64_json", False, 0)
    assert request.height_width() == (None, None)


@pytest.mark.parametrize("field, value", [
    ("n", "3"), ("n", True), ("n", 2.0), ("num_inference_steps", "10"), ("seed", 1.5),
    ("guidance_scale", "7"), ("stream", "yes"), ("prompt", 5), ("size", 512),
])
def test_wrong_types_are_not_coerced(field, value):
    body = {"prompt": "a cat", field: value}
    assert error_fields(**body) == [field]


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 9), ("num_inference_steps", 0), ("num_inference_steps", 201), ("seed", -1),
    ("seed", MAX_SEED + 1), ("guidance_scale", 100.5), ("guidance_scale", float("nan")), ("partial_images", 4),
    ("slo_ms", 0), ("prompt", "x" * 2001), ("prompt", " \n\t"), ("prompt", "\ud800"), ("negative_prompt", "\udfff"),
    ("response_format", "jpeg"), ("output_format", "webp"),
])
def test_out_of_range_values_name_the_field(field, value):
    body = {"prompt": "a cat", field: value}
    assert error_fields(**body) == [field]


def test_unknown_fields_are_rejected():
    assert error_fields(prompt="a cat", steps=4) == ["steps"]


def test_integer_guidance_is_a_number():
    assert ImageGenerationRequest(prompt="a cat", guidance_scale=7).guidance_scale == 7.0


@pytest.mark.parametrize("size, expected", [("512x256", (256, 512)), ("64X32", (32, 64)), ("auto", (None, None))])
def test_size_is_width_by_height(size, expected):
    assert ImageGenerationRequest(prompt="a cat", size=size).height_width() == expected


@pytest.mark.parametrize("size", ["512", "axb", "512x", "-5x5", "1x2x3"])
def test_bad_size_raises_invalid_request(size):
    with pytest.raises(InvalidRequestError) as info:
        ImageGenerationRequest(prompt="a cat", size=size).height_width()
    assert info.value.param == "size"


def test_seeds_are_consecutive_and_bounded():
    assert ImageGenerationRequest(prompt="a cat", n=3).seeds(10) == [10, 11, 12]
    with pytest.raises(InvalidRequestError) as info:
        ImageGenerationRequest(prompt="a cat", n=3).seeds(MAX_SEED - 1)
    assert info.value.param == "seed" and str(MAX_SEED - 2) in info.value.message


def test_error_envelope_has_openai_shape():
    assert error_response_body(400, "bad n", "n", "invalid_request") == {
        "error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}
    assert error_response_body(429, "full", code="queue_full")["error"]["type"] == "rate_limit_error"
    assert error_response_body(500, "boom")["error"]["type"] == "server_error"
    assert error_response_body(503, "draining")["error"]["type"] == "server_error"
    assert error_response_body(401, "key")["error"]["type"] == "invalid_request_error"


class FakeClock:
    """A settable clock for time-window logic."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_image_store_expires_and_evicts_oldest():
    clock = FakeClock()
    store = ImageStore(capacity=2, ttl_s=10, clock=clock)
    first, second = store.put(b"1"), store.put(b"2")
    third = store.put(b"3")
    assert store.get(first) is None and store.get(second) == b"2" and store.get(third) == b"3"
    clock.now += 11
    assert store.get(second) is None and store.get(third) is None
    assert store.get("img_unknown") is None


class Stats:
    num_waiting = 4
    num_running = 2


def test_metrics_use_a_registry_per_instance():
    clock = FakeClock()
    first, second = ServerMetrics(Stats, clock=clock), ServerMetrics(Stats, clock=clock)
    first.observe_image(RequestTimings(queued_s=0.5, total_s=1.0))
    assert first.registry.get_sample_value("glideserve_images_generated_total") == 1
    assert second.registry.get_sample_value("glideserve_images_generated_total") == 0
    assert first.registry.get_sample_value("glideserve_queue_depth") == 4
    assert first.registry.get_sample_value("glideserve_running_requests") == 2
    assert b"glideserve_queue_latency_seconds_bucket" in first.render()


def test_slo_is_met_or_missed_against_total_latency():
    metrics = ServerMetrics(Stats)
    assert metrics.observe_completed(0.2, slo_ms=250) is True
    assert metrics.observe_completed(0.3, slo_ms=250) is False
    assert metrics.observe_completed(0.3, slo_ms=None) is None
    value = metrics.registry.get_sample_value
    assert value("glideserve_slo_total", {"result": "met"}) == 1
    assert value("glideserve_slo_total", {"result": "missed"}) == 1
    assert value("glideserve_requests_total", {"status": "completed"}) == 3


def test_images_per_minute_counts_a_trailing_minute():
    clock = FakeClock()
    metrics = ServerMetrics(Stats, clock=clock)
    for _ in range(3):
        metrics.observe_image(RequestTimings())
    assert metrics.images_per_minute() == 3
    clock.now += 61
    assert metrics.images_per_minute() == 0


def test_step_listener_records_batch_and_latency():
    class Step:
        duration_s, num_requests, num_rows = 0.02, 3, 5

    metrics = ServerMetrics(Stats)
    metrics.on_step(Step)
    value = metrics.registry.get_sample_value
    assert value("glideserve_batch_size_requests") == 3 and value("glideserve_batch_size_rows") == 5
    assert value("glideserve_step_latency_seconds_count") == 1


@pytest.mark.parametrize("kwargs", [{"max_queue": 0}, {"image_ttl_s": 0}, {"api_key": " "}, {"max_body_bytes": 0}])
def test_server_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)


def test_missing_baselines_module_is_named(monkeypatch):
    import glideserve.bench
    from glideserve.cli.serve import BASELINES_MODULE, System, make_backend

    # As if this installation had no baselines module.
    monkeypatch.setitem(sys.modules, BASELINES_MODULE, None)
    monkeypatch.delattr(glideserve.bench, "baselines", raising=False)
    with pytest.raises(GlideServeError) as info:
        make_backend(System.request_batching, "glide-tiny")
    assert BASELINES_MODULE in info.value.message
