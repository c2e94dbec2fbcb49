"""/v1/fine_tuning/jobs and /v1/files on a live server of glide-tiny: validation, a job that trains while the
server is idle and whose adapter is served at once, its events, cancellation freeing its memory."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
import pytest

pytest.importorskip("peft")

from glideserve.toy.concept import write_concept_dataset  # noqa: E402
from live_server import LiveServer  # noqa: E402


def _zip_folder(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"pairs/{path.name}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    (root / "loras").mkdir()
    (root / "data").mkdir()
    write_concept_dataset(root / "data" / "pink", "pink", 16, seed=2)
    with LiveServer("glide-tiny", data_dir=root / "data", lora_dir=str(root / "loras")) as live:
        live.root = root
        yield live


def _wait_job(server, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.api}/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def _job(**overrides) -> dict:
    body = {"model": "glide-tiny", "training_file": "pink", "suffix": "pink", "seed": 1,
            "hyperparameters": {"n_steps": 20, "batch_size": 2, "learning_rate": 0.01, "lora_rank": 4}}
    return {**body, **overrides}


@pytest.mark.parametrize("body, status, code", [
    (_job(training_file="../etc"), 400, "invalid_request"),
    (_job(training_file="missing"), 400, "invalid_request"),
    (_job(model="other"), 404, "model_not_found"),
    (_job(suffix="a/b"), 400, "invalid_request"),
    (_job(hyperparameters={"n_steps": 0}), 400, None),
    (_job(hyperparameters={"lora_rank": 4, "target_modules": ["conv_in"]}), 400, "invalid_request"),
    (_job(extra=1), 400, None),
])
def test_bad_jobs_are_refused_with_a_reason(server, body, status, code):
    answer = httpx.post(f"{server.api}/fine_tuning/jobs", json=body)
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["error"]["code"] == code


def test_dataset_uploads_are_validated(server, tmp_path):
    files = {"file": ("d.zip", _zip_folder(server.root / "data" / "pink"), "application/zip")}
    answer = httpx.post(f"{server.api}/files", files=files, data={"purpose": "fine-tune"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["pairs"] == 16 and (server.root / "data" / answer.json()["id"]).is_dir()
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../evil.png", b"x")
    for content, purpose, message in ((evil.getvalue(), "fine-tune", "unsafe name"),
                                      (b"not a zip", "fine-tune", "not a zip"),
                                      (files["file"][1], "assistants", "purpose")):
        answer = httpx.post(f"{server.api}/files", files={"file": ("d.zip", content)}, data={"purpose": purpose})
        assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text
    assert not (server.root / "evil.png").exists()


def test_a_job_trains_when_idle_and_its_adapter_is_served_at_once(server):
    created = httpx.post(f"{server.api}/fine_tuning/jobs", json=_job())
    assert created.status_code == 200, created.text
    job = _wait_job(server, created.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "pink" and job["trained_steps"] == 20
    assert job["loss"] is not None and job["steps_per_minute"] > 0
    assert (server.root / "loras" / "pink.safetensors").is_file()
    image = httpx.post(f"{server.api}/images/generations", json={"prompt": "a pink circle on a white background",
                                                                  "lora": "pink", "seed": 3}, timeout=120)
    assert image.status_code == 200, image.text
    with httpx.stream("GET", f"{server.api}/fine_tuning/jobs/{job['id']}/events", timeout=30) as stream:
        data = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert data[0]["message"] == "job created" and data[-1]["object"] == "fine_tuning.job"
    assert any(e.get("message", "").startswith("step 20/20") for e in data)
    listed = httpx.get(f"{server.api}/fine_tuning/jobs/{job['id']}/events", params={"stream": "false"}).json()
    assert [e["seq"] for e in listed["data"]] == sorted(e["seq"] for e in listed["data"])
    again = httpx.post(f"{server.api}/fine_tuning/jobs", json=_job())
    assert again.status_code == 400 and "exists already" in again.json()["error"]["message"]


def test_cancelling_a_job_frees_its_memory(server):
    body = _job(suffix="long", hyperparameters={"n_steps": 100000, "batch_size": 2, "lora_rank": 4})
    job_id = httpx.post(f"{server.api}/fine_tuning/jobs", json=body).json()["id"]
    _wait_job(server, job_id, ("running",))
    ledger = server.backend.models.get("glide-tiny").core.scheduler.memory
    assert ledger.holds(f"finetune:{job_id}")
    cancelled = httpx.post(f"{server.api}/fine_tuning/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while ledger.holds(f"finetune:{job_id}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ledger.holds(f"finetune:{job_id}")
    assert server.backend.fine_tuning._trainer is None
    assert httpx.get(f"{server.api}/fine_tuning/jobs/nope").status_code == 404
