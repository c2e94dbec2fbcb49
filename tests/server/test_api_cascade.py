"""A cascade behind the HTTP API: who answers, why, escalation exactly below the threshold, opting out,
the preview of an escalated request, metrics, and the allocator re-planning threshold and shares."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import LiveServer

from glideserve.cascade import discriminator
from glideserve.cascade.profiles import EscalationProfile
from glideserve.cascade.serving import CascadeConfig
from glideserve.server import ServerConfig


@pytest.fixture(scope="module")
def disc_folder(tmp_path_factory):
    """An untrained small CNN: its confidences are arbitrary but deterministic, which is all routing needs."""
    disc = discriminator.build("small-cnn")
    disc.report = {"escalated_fraction_at_threshold": EscalationProfile((0.25, 0.5, 0.75), (0.2, 0.5, 0.8)).as_dict()}
    return disc.save(tmp_path_factory.mktemp("disc") / "light")


def _cascade_server(tiny_model, disc_folder, threshold, slo_ms=None):
    config = CascadeConfig("light", "heavy", str(disc_folder), threshold, interval_s=3600)
    return LiveServer([f"heavy={tiny_model}", f"light={tiny_model}"], ServerConfig(default_slo_ms=slo_ms),
                      cascade=config, profile=False)


def _body(seed: int, **extra) -> dict:
    return {"prompt": f"a red circle number {seed}", "size": "32x32", "seed": seed, "num_inference_steps": 2,
            "guidance_scale": 1.0, **extra}


@pytest.fixture(scope="module")
def cascade_server(tiny_model, disc_folder):
    with _cascade_server(tiny_model, disc_folder, threshold=0.0) as live:
        yield live


def _generate(live, **body) -> dict:
    response = httpx.post(f"{live.api}/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]


def test_the_cascade_escalates_exactly_the_requests_below_its_threshold(cascade_server):
    controller = cascade_server.backend.controller
    controller.threshold = 0.0  # nothing escalates: read every light image's confidence
    first = {seed: _generate(cascade_server, **_body(seed)) for seed in range(6)}
    assert all(d["served_by"] == "light" and not d["cascade"]["escalated"] for d in first.values())
    confidences = sorted(d["cascade"]["confidence"] for d in first.values())
    threshold = (confidences[2] + confidences[3]) / 2  # half below, half above
    controller.threshold = threshold
    escalations_before = cascade_server.backend.counts["escalated"]
    for seed, before in first.items():
        data = _generate(cascade_server, **_body(seed))
        verdict = data["cascade"]
        assert verdict["confidence"] == pytest.approx(before["cascade"]["confidence"], abs=1e-5)
        below = verdict["confidence"] < threshold
        assert verdict["escalated"] is below and verdict["threshold"] == pytest.approx(threshold)
        assert data["served_by"] == ("heavy" if below else "light")
        assert verdict["reason"] == ("below_threshold" if below else "confident")
    assert cascade_server.backend.counts["escalated"] - escalations_before == 3
    metrics = httpx.get(f"{cascade_server.url}/metrics").text
    assert f"glideserve_cascade_escalations_total {float(cascade_server.backend.counts['escalated'])}" in metrics
    assert 'glideserve_cascade_requests_total{served_by="heavy"}' in metrics


def test_models_list_the_cascade_first_as_the_default(cascade_server):
    cards = httpx.get(f"{cascade_server.api}/models").json()["data"]
    assert [c["id"] for c in cards] == ["cascade", "heavy", "light"]
    assert [c["default"] for c in cards] == [True, False, False]


def test_opting_out_or_naming_a_model_skips_the_cascade(cascade_server):
    cascade_server.backend.controller.threshold = 1.0  # everything in the cascade would escalate
    direct = _generate(cascade_server, **_body(1, cascade=False))
    assert direct["served_by"] == "heavy" and direct["cascade"] is None
    light = _generate(cascade_server, **_body(1, model="light"))
    assert light["served_by"] == "light" and light["cascade"] is None
    named = _generate(cascade_server, **_body(1, model="cascade"))
    assert named["served_by"] == "heavy" and named["cascade"]["escalated"]
    response = httpx.post(f"{cascade_server.api}/images/generations", json=_body(1, model="light", cascade=True))
    assert response.status_code == 400 and response.json()["error"]["param"] == "cascade"


def test_an_escalated_stream_previews_the_light_image_then_completes_from_the_heavy_model(cascade_server):
    cascade_server.backend.controller.threshold = 1.0
    with httpx.stream("POST", f"{cascade_server.api}/images/generations", json=_body(2, stream=True),
                      timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    preview = next(e for e in events if e["type"] == "image_generation.partial_image")
    completed = events[-1]
    assert preview["cascade"]["escalated"] and kinds.index("image_generation.partial_image") < len(kinds) - 1
    assert completed["type"] == "image_generation.completed" and completed["served_by"] == "heavy"
    assert completed["cascade"]["escalated"]


def test_a_server_without_a_cascade_refuses_the_field(server):
    response = httpx.post(f"{server.api}/images/generations", json=_body(0, cascade=True))
    assert response.status_code == 400 and "no cascade" in response.json()["error"]["message"]


def test_auto_threshold_replans_threshold_and_step_time_shares(tiny_model, disc_folder):
    with _cascade_server(tiny_model, disc_folder, threshold=None, slo_ms=60_000) as live:
        for seed in range(3):
            _generate(live, **_body(seed))
        plan = live.backend.controller.replan()
        assert plan is not None and plan.demand > 0
        assert 0.0 <= plan.threshold <= 1.0 and live.backend.controller.threshold == plan.threshold
        if plan.overloaded:  # three requests in well under a second: more than this CPU carries
            assert plan.threshold == 0.0 and plan.heavy_capacity == 0.0
        models = live.backend.engine.models
        assert models.get("light").share == pytest.approx(max(0.05, plan.light_capacity))
        assert models.get("heavy").share == pytest.approx(max(0.05, plan.heavy_capacity))
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'glideserve_cascade_share{model="heavy"}' in metrics


def test_cascade_option_parsing():
    config = CascadeConfig.parse("light=glide-turbo,heavy=glide-base,threshold=0.3")
    assert (config.light, config.heavy, config.threshold) == ("glide-turbo", "glide-base", 0.3)
    assert config.discriminator.endswith("glide-turbo")
    assert CascadeConfig.parse("light=a,heavy=b").threshold is None
    for bad, message in [("light=a", "heavy"), ("light=a,heavy=a", "different"), ("light=a,heavy=b,threshold=2",
                         "threshold"), ("light=a,heavy=b,speed=3", "no key"), ("light", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            CascadeConfig.parse(bad)


def test_a_drain_answers_every_admitted_cascade_request(tiny_model, disc_folder):
    import signal
    import threading
    import time

    live = _cascade_server(tiny_model, disc_folder, threshold=1.0)  # every request would escalate
    answers: dict[int, httpx.Response] = {}

    def send(seed: int) -> None:
        body = _body(seed, num_inference_steps=12)
        answers[seed] = httpx.post(f"{live.api}/images/generations", json=body, timeout=120)

    with live:
        threads = [threading.Thread(target=send, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while True:  # all four admitted, the light stage under way
            stats = live.backend.stats()
            if stats.num_running + stats.num_waiting == 4 and stats.num_running > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        live._server.handle_exit(signal.SIGTERM, None)
        for thread in threads:
            thread.join(timeout=120)
    assert sorted(answers) == [0, 1, 2, 3]
    for response in answers.values():
        assert response.status_code == 200, response.text
        data = response.json()["data"][0]
        verdict = data["cascade"]
        # Escalated and answered by the heavy model, or refused by it while draining and answered by the
        # light image: never lost.
        assert (data["served_by"], verdict["reason"]) in {("heavy", "below_threshold"), ("light", "heavy_refused")}
