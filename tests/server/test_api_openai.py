"""The image API through the official ``openai`` client against a live server."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import openai
import pytest
from live_server import LiveServer, pixel_mismatch
from live_server import decode_png as decode
from PIL import Image

from glideserve.server import ServerConfig

FAST = {"num_inference_steps": 3}


def test_generate_returns_png_of_requested_size(openai_client):
    result = openai_client.images.generate(model="tiny", prompt="a red circle", size="64x32",
                                           extra_body={**FAST, "seed": 7})
    assert len(result.data) == 1
    assert result.data[0].revised_prompt is None
    assert decode(result.data[0].b64_json).shape == (32, 64, 3)
    assert result.data[0].model_extra["seed"] == 7
    assert result.model_extra["timings"]["images"][0]["steps"] == 3
    assert result.size == "64x32"


def test_same_seed_reproduces_and_n_uses_consecutive_seeds(openai_client):
    many = openai_client.images.generate(prompt="a blue square", n=3, extra_body={**FAST, "seed": 40})
    assert [d.model_extra["seed"] for d in many.data] == [40, 41, 42]
    images = [decode(d.b64_json) for d in many.data]
    assert not np.array_equal(images[0], images[1])
    alone = openai_client.images.generate(prompt="a blue square", extra_body={**FAST, "seed": 41})
    assert pixel_mismatch(decode(alone.data[0].b64_json), images[1]) is None


def test_url_response_format_serves_the_png(server, openai_client):
    result = openai_client.images.generate(prompt="a cat", response_format="url", extra_body=FAST)
    assert result.data[0].url.startswith("/v1/images/img_")  # relative: no --public-url
    response = httpx.get(server.url + result.data[0].url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)


def test_stream_sends_steps_in_order_then_the_image(openai_client):
    stream = openai_client.images.generate(prompt="a green tree", stream=True, partial_images=2,
                                           extra_body={"num_inference_steps": 4, "seed": 3})
    events = [event.to_dict() for event in stream]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "image_generation.completed"
    steps = [e["step"] for e in events if e["type"] == "image_generation.progress" and e["step"] > 0]
    assert steps == [1, 2, 3, 4]
    assert all(e["total"] == 4 for e in events if e["type"] == "image_generation.progress")
    partials = [e for e in events if e["type"] == "image_generation.partial_image"]
    assert [e["partial_image_index"] for e in partials] == [0, 1]
    for partial in partials:  # each preview follows the progress event of its own step
        position = events.index(partial)
        assert events[position - 1]["type"] == "image_generation.progress"
        assert events[position - 1]["step"] == partial["step"] < 4
        assert decode(partial["b64_json"]).shape[0] < 32
    final = events[-1]
    assert final["size"] == "32x32" and final["output_format"] == "png" and final["seed"] == 3
    plain = openai_client.images.generate(prompt="a green tree", extra_body={"num_inference_steps": 4, "seed": 3})
    np.testing.assert_array_equal(decode(final["b64_json"]), decode(plain.data[0].b64_json))


def test_stream_with_n_completes_every_image(openai_client):
    stream = openai_client.images.generate(prompt="a moon", n=2, stream=True, extra_body={**FAST, "seed": 9})
    completed = [e for e in stream if e.type == "image_generation.completed"]
    assert sorted((e.image_index, e.seed) for e in completed) == [(0, 9), (1, 10)]


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"size": "33x32"}, "size"),
    ({"size": "big"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
    ({"extra_body": {"num_inference_steps": 201}}, "num_inference_steps"),
    ({"extra_body": {"num_inference_steps": "4"}}, "num_inference_steps"),
    ({"extra_body": {"guidance_scale": -1}}, "guidance_scale"),
    ({"extra_body": {"seed": -1}}, "seed"),
    ({"extra_body": {"sampler": "nope"}}, "sampler"),
    ({"extra_body": {"steps": 4}}, "steps"),
    ({"extra_body": {"cache": "lru:2"}}, "cache"),
    ({"extra_body": {"cache": "glideserve:0"}}, "cache"),
    ({"extra_body": {"cache": 5}}, "cache"),
    ({"extra_body": {"latent_aware": "yes"}}, "latent_aware"),
    ({"extra_body": {"lora": "style"}}, "lora"),
    ({"extra_body": {"lora": "../etc/passwd"}}, "lora"),
    ({"response_format": "jpeg"}, "response_format"),
])
def test_client_mistakes_get_400_with_envelope(openai_client, kwargs, param):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(**kwargs)
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.images.generate(model="dall-e-3", prompt="a cat")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "prompt"),
    (b"", "body"),
    (b'{"prompt": "\\ud800"}', "unicode"),
])
def test_malformed_bodies_get_400(server, content, message):
    response = httpx.post(f"{server.api}/images/generations", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_oversized_body_is_413(server):
    response = httpx.post(f"{server.api}/images/generations", json={"prompt": "a" * 200_000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method_use_the_envelope(server):
    assert httpx.get(f"{server.api}/nothing").json()["error"]["code"] == "not_found"
    response = httpx.put(f"{server.api}/images/generations")
    assert response.status_code == 405 and "error" in response.json()
    response = httpx.get(f"{server.api}/images/img_missing")
    assert response.status_code == 404 and response.json()["error"]["param"] == "image_id"


def test_models_health_ready_and_playground(server, openai_client):
    assert [m.id for m in openai_client.models.list()] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/images/generations" in page.text


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed with prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_images_and_slo(server, openai_client):
    before = scrape(server.url)
    openai_client.images.generate(prompt="a dog", n=2, extra_body={**FAST, "slo_ms": 3_600_000})
    with pytest.raises(openai.RateLimitError, match="cannot finish within its SLO"):
        openai_client.images.generate(prompt="a dog", extra_body={**FAST, "slo_ms": 0.001})
    after = scrape(server.url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("glideserve_images_generated_total") == 2
    assert delta("glideserve_slo_total", result="met") == 1
    assert delta("glideserve_requests_total", status="completed") == 1
    assert delta("glideserve_requests_total", status="slo_unattainable") == 1
    assert delta("glideserve_scheduler_decisions_total", decision="refused") == 1
    assert delta("glideserve_request_latency_seconds_count") == 1
    assert delta("glideserve_queue_latency_seconds_count") == 2
    assert delta("glideserve_step_latency_seconds_count") >= FAST["num_inference_steps"]
    for gauge in ("glideserve_queue_depth", "glideserve_running_requests", "glideserve_batch_size_requests",
                  "glideserve_batch_size_rows"):
        assert (gauge, ()) in after
    stats = httpx.get(f"{server.api}/stats").json()
    assert stats["images_per_min"] >= 3 and stats["queue_depth"] == 0 and stats["model"] == "tiny"


def test_a_deadline_blind_policy_serves_and_counts_a_missed_slo(tiny_model):
    with LiveServer(tiny_model, ServerConfig(model_id="tiny", warmup=False), policy="fcfs") as live:
        before = scrape(live.url)
        response = httpx.post(f"{live.api}/images/generations", timeout=60,
                              json={"prompt": "a dog", **FAST, "slo_ms": 0.001, "response_format": "b64_json"})
        after = scrape(live.url)
    assert response.status_code == 200 and response.json()["timings"]["slo_met"] is False
    key = ("glideserve_slo_total", (("result", "missed"),))
    assert after[key] - before.get(key, 0.0) == 1


def test_api_key_is_enforced(tiny_model):
    with LiveServer(tiny_model, ServerConfig(api_key="s3cret", warmup=False)) as live:
        with openai.OpenAI(base_url=live.api, api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                client.images.generate(prompt="a cat", extra_body=FAST)
            assert info.value.body["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=live.api, api_key="s3cret", max_retries=0) as client:
            assert client.images.generate(prompt="a cat", extra_body=FAST).data[0].b64_json
        assert httpx.get(f"{live.api}/stats").status_code == 401
        assert httpx.get(f"{live.url}/health").status_code == 200


def test_full_queue_answers_429_with_retry_after(tiny_model):
    with LiveServer(tiny_model, ServerConfig(max_queue=2, warmup=False), max_waiting=2) as live:
        response = httpx.post(f"{live.api}/images/generations", json={"prompt": "a cat", "n": 3})
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        body = response.json()["error"]
        assert body["code"] == "queue_full" and body["type"] == "rate_limit_error"


def test_waiting_request_streams_its_queue_position(tiny_model):
    """With room for one request per step, a second request waits and is told its position."""
    long_body = {"prompt": "a cat", "stream": True, "num_inference_steps": 200, "size": "64x64", "seed": 1}
    with LiveServer(tiny_model, ServerConfig(warmup=False), max_batch_rows=2) as live:
        with httpx.stream("POST", f"{live.api}/images/generations", json=long_body, timeout=120) as first:
            lines = first.iter_lines()  # kept open: a closed iterator would close the connection
            next(line for line in lines if line.startswith("data:") and json.loads(line[5:])["step"] >= 1)
            with openai.OpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=120) as client:
                second = client.images.generate(prompt="a dog", stream=True, extra_body={**FAST, "seed": 2})
                waiting = next(iter(second)).to_dict()
                httpx.delete(f"{live.api}/requests/{first.headers['x-request-id']}")
                rest = [e.to_dict() for e in second]
    assert waiting["type"] == "image_generation.progress"
    assert waiting["step"] == 0 and waiting["queue_position"] == 0
    steps = [e["step"] for e in rest if e["type"] == "image_generation.progress" and e["queue_position"] is None]
    assert steps == [1, 2, 3] and rest[-1]["type"] == "image_generation.completed"


def test_cache_policy_per_request_shows_in_timings_and_metrics(server, openai_client):
    def steps_metric(kind: str) -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(f'glideserve_denoising_steps_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = steps_metric("cached")
    cached = openai_client.images.generate(prompt="a cat", extra_body={"num_inference_steps": 6, "seed": 3,
                                                                      "cache": "glideserve:2"})
    exact = openai_client.images.generate(prompt="a cat", extra_body={"num_inference_steps": 6, "seed": 3})
    timing = cached.model_extra["timings"]["images"][0]
    assert (timing["full_steps"], timing["cached_steps"]) == (2, 4)
    assert exact.model_extra["timings"]["images"][0]["cached_steps"] == 0
    assert cached.data[0].b64_json != exact.data[0].b64_json  # the cache changes the image; none is exact
    assert steps_metric("cached") - before == 4
