"""Several models behind one server: routing by `model`, /v1/models, and loading under a weights budget."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from live_server import LiveServer, response_image as _image
from PIL import Image

from glideserve.server import ServerConfig

MAX_SEQ = 16


@pytest.fixture(scope="module")
def model_paths(tiny_model, tiny_sd15_dir):
    return {"sd3": str(tiny_model), "sd15": str(tiny_sd15_dir)}


@pytest.fixture(scope="module")
def references(model_paths):
    """Each model's own diffusers pipeline, run alone per request."""
    pipes = {}
    for name, path in model_paths.items():
        pipes[name] = DiffusionPipeline.from_pretrained(path)
        pipes[name].set_progress_bar_config(disable=True)

    def reference(model: str, body: dict) -> np.ndarray:
        extra = {"max_sequence_length": MAX_SEQ} if model == "sd3" else {}
        image = pipes[model](body["prompt"], num_inference_steps=body["num_inference_steps"], height=32, width=32,
                             guidance_scale=body["guidance_scale"],
                             generator=torch.Generator("cpu").manual_seed(body["seed"]), **extra).images[0]
        return np.asarray(image, dtype=int)
    return reference


def _body(model: str | None, seed: int, **extra) -> dict:
    body = {"prompt": f"a shape number {seed}", "size": "32x32", "seed": seed, "num_inference_steps": 4,
            "guidance_scale": 3.0, **extra}
    if model is not None:
        body["model"] = model
    return body


def _post_all(api: str, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{api}/images/generations", json=b, timeout=180), bodies))


@pytest.fixture(scope="module")
def two_models(model_paths):
    models = [f"{name}={path}" for name, path in model_paths.items()]
    with LiveServer(models, ServerConfig(model_id="sd3"), max_sequence_length=MAX_SEQ) as live:
        yield live


def test_models_are_listed_with_family_defaults_and_residency(two_models):
    cards = httpx.get(f"{two_models.api}/models").json()["data"]
    assert [c["id"] for c in cards] == ["sd3", "sd15"]
    sd3, sd15 = cards
    assert (sd3["family"], sd15["family"]) == ("sd3", "sd15")
    assert sd3["default"] and not sd15["default"] and sd3["loaded"] and sd15["loaded"]
    assert sd3["default_size"] and sd15["default_steps"] >= 1


def test_interleaved_requests_for_two_models_each_match_their_own_pipeline(two_models, references):
    bodies = [_body(["sd3", "sd15"][i % 2], seed=10 + i) for i in range(6)] + [_body(None, seed=99)]
    images = [_image(r) for r in _post_all(two_models.api, bodies)]
    for body, got in zip(bodies, images):
        want = references(body.get("model", "sd3"), body)
        assert np.abs(got - want).max() <= 2, body


def test_an_unknown_model_is_a_404_naming_the_served_ones(two_models):
    response = httpx.post(f"{two_models.api}/images/generations", json=_body("sdxl", seed=1), timeout=60)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'sd3'" in error["message"] and "'sd15'" in error["message"]
    loras = httpx.get(f"{two_models.api}/loras", params={"model": "sdxl"}, timeout=60)
    assert loras.status_code == 404


def _stream_events(api: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{api}/images/generations", json={**body, "stream": True}, timeout=180) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_a_one_model_budget_unloads_the_idle_model_and_loads_on_demand(model_paths, references):
    models = [f"{name}={path}" for name, path in model_paths.items()]
    with LiveServer(models, ServerConfig(model_id="sd3"), max_sequence_length=MAX_SEQ, max_loaded_models=1) as live:
        loaded = {c["id"]: c["loaded"] for c in httpx.get(f"{live.api}/models").json()["data"]}
        assert loaded == {"sd3": True, "sd15": False}  # each loaded once at start-up; the default stays
        # Admission counts the load: an SLO shorter than it is refused before anything loads.
        refused = httpx.post(f"{live.api}/images/generations", json=_body("sd15", seed=1, slo_ms=1), timeout=60)
        assert refused.status_code == 429 and "must be loaded first" in refused.json()["error"]["message"]

        body = _body("sd15", seed=5)
        events = _stream_events(live.api, body)
        assert events[0]["type"] == "image_generation.loading" and events[0]["model"] == "sd15"
        assert events[-1]["type"] == "image_generation.completed"
        png = base64.b64decode(events[-1]["b64_json"])
        got = np.array(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
        assert np.abs(got - references("sd15", body)).max() <= 2
        loaded = {c["id"]: c["loaded"] for c in httpx.get(f"{live.api}/models").json()["data"]}
        assert loaded == {"sd3": False, "sd15": True}

        # Both at once under a one-model budget: one model waits for the other to go idle; none fails.
        bodies = [_body(["sd3", "sd15"][i % 2], seed=20 + i) for i in range(6)]
        for body, response in zip(bodies, _post_all(live.api, bodies)):
            assert np.abs(_image(response) - references(body["model"], body)).max() <= 2, body
        cards = {card["name"]: card for card in live.backend.model_cards()}
        assert cards["sd3"]["loads"] >= 2 and cards["sd15"]["unloads"] + cards["sd3"]["unloads"] >= 2
        assert sum(card["loaded"] for card in cards.values()) == 1
        metrics = httpx.get(f"{live.url}/metrics").text
        for line in (f'glideserve_model_loads_total{{model="sd3"}} {float(cards["sd3"]["loads"])}',
                     f'glideserve_model_unloads_total{{model="sd15"}} {float(cards["sd15"]["unloads"])}',
                     'glideserve_model_step_seconds_total{model="sd15"}'):
            assert line in metrics, line


def test_a_weights_budget_keeps_only_what_fits(model_paths, references):
    models = [f"{name}={path}" for name, path in model_paths.items()]
    # Smaller than either model: the one in use stays resident alone, whatever its size.
    with LiveServer(models, ServerConfig(model_id="sd3"), max_sequence_length=MAX_SEQ,
                    weights_memory_gb=1e-6) as live:
        cards = {c["id"]: c["loaded"] for c in httpx.get(f"{live.api}/models").json()["data"]}
        assert cards == {"sd3": True, "sd15": False}
        body = _body("sd15", seed=8)
        assert np.abs(_image(httpx.post(f"{live.api}/images/generations", json=body, timeout=180))
                      - references("sd15", body)).max() <= 2
        cards = {c["id"]: c["loaded"] for c in httpx.get(f"{live.api}/models").json()["data"]}
        assert cards == {"sd3": False, "sd15": True}


def test_offloaded_models_come_back_from_host_memory_with_the_same_images(model_paths, references):
    models = [f"{name}={path}" for name, path in model_paths.items()]
    with LiveServer(models, ServerConfig(model_id="sd3"), max_sequence_length=MAX_SEQ, max_loaded_models=1,
                    offload_memory_gb=1.0) as live:
        cards = {card["name"]: card for card in live.backend.model_cards()}
        assert cards["sd15"]["offloaded"] and not cards["sd15"]["loaded"]  # parked after the start-up load
        for name in ("sd15", "sd3", "sd15"):
            body = _body(name, seed=7)
            response = httpx.post(f"{live.api}/images/generations", json=body, timeout=120)
            assert np.abs(_image(response) - references(name, body)).max() <= 2, name
        cards = {card["name"]: card for card in live.backend.model_cards()}
        assert cards["sd15"]["restores"] == 2 and cards["sd3"]["restores"] == 1  # no load from disk after start-up
        assert cards["sd15"]["loads"] == 3 and cards["sd3"]["offloaded"]
