"""The deployment on a local Ray Serve: 2 replicas of glide-tiny behind the ingress, one killed mid-run.

Every request is answered 200 with the image the single-machine server gives for the same seed; image
URLs and cancellation work across the replicas; ``/metrics`` covers both; ``down`` drains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")

from glideserve.cluster.config import parse_config  # noqa: E402
from glideserve.cluster.runtime import ClusterRuntime  # noqa: E402
from live_server import LiveServer, free_port  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
N_REQUESTS = 40
# Long enough that both replicas are mid-run when one is killed (2 requests per step, 40 steps each).
BODY = {"num_inference_steps": 40, "response_format": "b64_json"}
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square"]


def _body(i: int) -> dict:
    return {**BODY, "prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i}


def _pixels(answer: dict) -> np.ndarray:
    png = base64.b64decode(answer["data"][0]["b64_json"])
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


@pytest.fixture(scope="module")
def reference_images():
    """The single-machine server's image for each request."""
    with LiveServer("glide-tiny") as server:
        async def send_all():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(client.post(f"{server.api}/images/generations", json=_body(i))
                                              for i in range(N_REQUESTS)))
        answers = asyncio.run(send_all())
    assert all(a.status_code == 200 for a in answers)
    return [_pixels(a.json()) for a in answers]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, reference_images):
    config = parse_config({
        "port": free_port(), "drain_timeout_s": 60,
        "models": [{"name": "glide-tiny", "replicas": {"min": 2, "max": 2},
                    "engine": {"profile": False, "max_batch_rows": 4}}],
        "faults": {"hang_timeout_s": 10, "health_check_period_s": 1},
        "ray": {"num_cpus": 2},
    })
    runtime = ClusterRuntime(config, tmp_path_factory.mktemp("cluster"))
    runtime.up(ready_timeout_s=300)
    yield runtime
    runtime.down()


def _snapshots(runtime) -> list:
    import ray

    from glideserve.cluster import registry

    actor = ray.get_actor(registry.registry_name(runtime.config.app_name), namespace=registry.NAMESPACE)
    return ray.get(actor.snapshots.remote())


def _wait_for(predicate, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _send_all_while(cluster, action) -> list:
    """Send the N_REQUESTS at once, run ``action`` (blocking) while they run, return the answers in order."""
    async def send_all():
        async with httpx.AsyncClient(timeout=600) as client:
            sends = [asyncio.create_task(client.post(f"{cluster.url}/v1/images/generations", json=_body(i)))
                     for i in range(N_REQUESTS)]
            await asyncio.to_thread(action)
            return await asyncio.gather(*sends)

    return asyncio.run(send_all())


def _assert_answers_match(answers: list, reference_images: list) -> None:
    assert [a.status_code for a in answers] == [200] * N_REQUESTS, [a.text[:200] for a in answers
                                                                     if a.status_code != 200]
    for i, answer in enumerate(answers):
        assert np.abs(_pixels(answer.json()) - reference_images[i]).max() <= 1, f"request {i} differs"


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_killed_replica_loses_no_request_and_changes_no_image(cluster, reference_images):
    _wait_for(lambda: len(_snapshots(cluster)) == 2, "both replicas to report")
    killed: dict = {}

    def kill_a_busy_replica() -> None:
        busy = _wait_for(lambda: [s for s in _snapshots(cluster) if s.stats["num_running"] > 0],
                         "a replica with running requests", 60)
        killed["replica"] = busy[0]
        os.kill(busy[0].pid, signal.SIGKILL)

    _assert_answers_match(_send_all_while(cluster, kill_a_busy_replica), reference_images)
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert _metric(metrics, "glideserve_cluster_retries_total") >= 1  # the killed replica held requests
    assert _metric(metrics, 'glideserve_requests_total{status="completed"}') >= N_REQUESTS
    # Ray Serve replaces the dead replica; both report again, the dead one's process is gone.
    _wait_for(lambda: len(_snapshots(cluster)) == 2 and killed["replica"].replica not in
              {s.replica for s in _snapshots(cluster)}, "the replica to be replaced", 180)


def test_a_hung_replica_is_given_up_on_and_its_requests_retried(cluster, reference_images):
    _wait_for(lambda: len(_snapshots(cluster)) == 2, "both replicas to report")
    retries_before = _metric(httpx.get(f"{cluster.url}/metrics").text, "glideserve_cluster_retries_total")
    stopped: dict = {}

    def stop_a_busy_replica() -> None:
        busy = _wait_for(lambda: [s for s in _snapshots(cluster) if s.stats["num_running"] > 0],
                         "a replica with running requests", 60)
        stopped["pid"] = busy[0].pid
        os.kill(busy[0].pid, signal.SIGSTOP)  # alive but silent: no heartbeat, no step, no health check

    try:
        answers = _send_all_while(cluster, stop_a_busy_replica)
    finally:
        if "pid" in stopped:  # Ray replaces it; make sure the stopped process does not linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped["pid"], signal.SIGKILL)
    _assert_answers_match(answers, reference_images)
    assert _metric(httpx.get(f"{cluster.url}/metrics").text, "glideserve_cluster_retries_total") > retries_before
    _wait_for(lambda: len(_snapshots(cluster)) == 2, "the hung replica to be replaced", 180)


def test_image_urls_and_cancellation_across_replicas(cluster):
    # Image URLs: the ingress keeps the images of every replica.
    answer = httpx.post(f"{cluster.url}/v1/images/generations",
                        json={"prompt": "a red circle", "n": 2, "seed": 5, "response_format": "url"}, timeout=300)
    assert answer.status_code == 200, answer.text
    for item in answer.json()["data"]:
        image = httpx.get(cluster.url + item["url"], timeout=30)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # Cancellation reaches the replica that holds the request: its slot is freed.
    long = {"prompt": "a blue square", "num_inference_steps": 200, "size": "64x64", "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/images/generations", json=long, timeout=300) as response:
        request_id = response.headers.get_list("x-request-id")[0]  # Ray's proxy repeats the header
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("event: image_generation.progress"))
        cancel = httpx.delete(f"{cluster.url}/v1/requests/{request_id}", timeout=30)
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        last = [json.loads(line[5:]) for line in lines if line.startswith("data:")][-1]
    assert last["type"] == "error" and last["error"]["code"] == "cancelled"
    _wait_for(lambda: all(s.stats["num_running"] + s.stats["num_waiting"] == 0 for s in _snapshots(cluster)),
              "the cancelled request to leave its replica", 30)


def test_metrics_cover_every_replica(cluster):
    _wait_for(lambda: len(_snapshots(cluster)) == 2, "both replicas to report")
    steps = sum(s.stats["steps_total"] for s in _snapshots(cluster))
    metrics = _wait_for(lambda: (lambda t: t if _metric(t, 'glideserve_cluster_replicas{model="glide-tiny"}') == 2
                                 else None)(httpx.get(f"{cluster.url}/metrics").text), "metrics of 2 replicas", 30)
    assert _metric(metrics, "glideserve_step_latency_seconds_count") > 0
    assert steps > 0


def test_down_drains_admitted_requests(cluster):
    """Runs last (the module's deployment goes down): requests admitted before ``down`` all finish."""
    answers: list = []

    def send(i: int) -> None:  # long enough (200 steps) to be in flight when the replicas report
        answers.append(httpx.post(f"{cluster.url}/v1/images/generations",
                                  json={**_body(i), "num_inference_steps": 200}, timeout=300))

    senders = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for sender in senders:
        sender.start()
    _wait_for(lambda: sum(s.stats["num_running"] + s.stats["num_waiting"] for s in _snapshots(cluster)) >= 1,
              "requests to be admitted", 60)
    cluster.down()
    for sender in senders:
        sender.join(300)
    assert [a.status_code for a in answers] == [200] * 6
