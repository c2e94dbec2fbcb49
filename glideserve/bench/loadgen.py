"""Open-loop HTTP load: every request leaves at its scheduled time, however slow the server is.

The client speaks ``POST /v1/images/generations`` (the OpenAI images API plus
``seed``, ``num_inference_steps``, ``guidance_scale`` and ``slo_ms``). A dispatcher
sleeps until each arrival on a monotonic clock and starts the request as its own
task, so a slow response never delays a later arrival; the connection pool is
unbounded for the same reason.
"""

from __future__ import annotations

import asyncio
import base64
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import httpx

from glideserve.bench.arrivals import Schedule
from glideserve.bench.records import DROPPED, LATE, ON_TIME, REFUSAL_CODES, REFUSED, RequestRecord

GENERATIONS_PATH = "/v1/images/generations"
TOY_COLORS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "brown", "gray")
TOY_SHAPES = ("circle", "square", "triangle")
# Start the clock a little in the future so the first arrival (offset 0) is not late
# because of task start-up.
_START_LEAD_S = 0.05


def toy_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of the form ``a {color} {shape} on a {background} background``."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        color, background = rng.sample(TOY_COLORS, 2)
        captions.append(f"a {color} {rng.choice(TOY_SHAPES)} on a {background} background")
    return captions


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


@dataclass(frozen=True)
class RequestTemplate:
    """Body fields shared by every request; request ``i`` gets seed ``base_seed + i``.

    ``None`` fields are left out so the server's defaults apply. A mixed workload
    gives ``steps_mix`` and/or ``size_mix``: request ``i`` then draws its steps and
    size uniformly from them with a generator seeded by ``(base_seed, i)``, so every
    system sees the same request at the same index. Each (steps, size) pair is a
    *class*, named by :meth:`class_label`, with its own isolated latency and SLO.
    """

    model: str | None = None
    size: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    base_seed: int = 0
    steps_mix: tuple[int, ...] = ()
    size_mix: tuple[str, ...] = ()

    def for_index(self, index: int) -> "RequestTemplate":
        """This template with request ``index``'s draw from the mixes (itself without mixes)."""
        if not self.steps_mix and not self.size_mix:
            return self
        rng = random.Random(self.base_seed * 1_000_003 + index)
        steps = rng.choice(self.steps_mix) if self.steps_mix else self.num_inference_steps
        size = rng.choice(self.size_mix) if self.size_mix else self.size
        return replace(self, num_inference_steps=steps, size=size, steps_mix=(), size_mix=())

    def classes(self) -> list["RequestTemplate"]:
        """One mix-free template per (steps, size) class, in a stable order."""
        steps = self.steps_mix or (self.num_inference_steps,)
        sizes = self.size_mix or (self.size,)
        return [replace(self, num_inference_steps=n, size=z, steps_mix=(), size_mix=()) for n in steps for z in sizes]

    @property
    def class_label(self) -> str:
        """``"20 steps 64x64"``; ``default`` stands for a field the server chooses."""
        steps = "default" if self.num_inference_steps is None else str(self.num_inference_steps)
        return f"{steps} steps {self.size or 'default size'}"

    def body(self, prompt: str, index: int, slo_s: float | None) -> dict:
        body = {"prompt": prompt, "n": 1, "response_format": "b64_json", "seed": self.base_seed + index}
        for name in ("model", "size", "num_inference_steps", "guidance_scale"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if slo_s is not None:
            body["slo_ms"] = int(round(slo_s * 1000))
        return body


def new_client(timeout_s: float) -> httpx.AsyncClient:
    """A client with no connection cap: a capped pool would queue requests on the client side."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # The total deadline is enforced around each request; this only bounds each socket phase.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits)


def _server_timings(body: dict) -> tuple[dict, dict]:
    """``(request timings, first image's timings)`` from the response, empty where absent.

    The server reports ``timings.total_s`` for the request and, per image in
    ``timings.images``, ``queued_s``, ``denoise_s``, ``decode_s``, ``total_s``.
    """
    timings = body.get("timings")
    if not isinstance(timings, dict):
        return {}, {}
    images = timings.get("images")
    first = images[0] if isinstance(images, list) and images and isinstance(images[0], dict) else {}
    return timings, first


async def send_one(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord, t0: float,
                   timeout_s: float, keep_image: bool = False) -> RequestRecord:
    """Send one request and fill ``record`` with when it left, when it ended and how
    (with ``keep_image``, also the returned PNG, for scoring after the run)."""
    record.sent_s = time.monotonic() - t0
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(url.rstrip("/") + GENERATIONS_PATH, json=body)
            # Parsing a large image body off the event loop keeps later arrivals on time.
            payload = await asyncio.to_thread(response.json) if response.status_code == 200 else None
    except (TimeoutError, httpx.TimeoutException):
        record.finished_s = time.monotonic() - t0
        record.status, record.error = LATE, f"no response within the client timeout of {timeout_s:g} s"
        return record
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a 200 whose body is not JSON
        record.finished_s = time.monotonic() - t0
        record.status, record.error = DROPPED, f"{type(exc).__name__}: {exc}"
        return record
    record.finished_s = time.monotonic() - t0
    record.http_status = response.status_code
    if response.status_code != 200:
        record.error = response.text[:300]
        record.error_code = _error_code(response)
        refused = response.status_code == 429 or record.error_code in REFUSAL_CODES
        record.status = REFUSED if refused else DROPPED
        return record
    data = payload.get("data") if isinstance(payload, dict) else None
    if not data or not data[0].get("b64_json"):
        record.status, record.error = DROPPED, "the response holds no data[0].b64_json image"
        return record
    record.completed = True
    timings, image_timings = _server_timings(payload)
    record.queued_s = _float_or_none(image_timings.get("queued_s"))
    record.server_total_s = _float_or_none(timings.get("total_s"))
    for name in ("full_steps", "cached_steps"):
        value = image_timings.get(name)
        setattr(record, name, value if isinstance(value, int) and not isinstance(value, bool) else None)
    record.served_by = str(data[0].get("served_by") or "")
    cascade = data[0].get("cascade")
    record.escalated = bool(cascade.get("escalated")) if isinstance(cascade, dict) else None
    if keep_image:
        record.image = await asyncio.to_thread(base64.b64decode, data[0]["b64_json"])
    late = record.slo_s is not None and record.latency_s > record.slo_s
    record.status = LATE if late else ON_TIME
    return record


def _error_code(response: httpx.Response) -> str:
    """``error.code`` of an OpenAI error envelope; empty when the body is not one."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


async def _warm_up(client: httpx.AsyncClient, url: str) -> None:
    """One throwaway GET so connection and client set-up are not charged to the first request."""
    try:
        await client.get(url.rstrip("/") + "/ready")
    except httpx.HTTPError:
        pass  # an unreachable server shows up as dropped requests, with the error, in the records


async def run_open_loop(url: str, schedule: Schedule, prompts: list[str], template: RequestTemplate, *,
                        slo_s: float | None | Mapping[str, float | None], timeout_s: float,
                        client: httpx.AsyncClient | None = None, keep_images: bool = False) -> list[RequestRecord]:
    """Send every request of ``schedule`` at its time and wait for all of them to end.

    Request ``i`` takes prompt ``prompt_ids[i]`` of a trace (modulo the number of
    prompts) or prompt ``i`` otherwise, and its class from ``template.for_index(i)``.
    ``slo_s`` is the per-request SLO, one for all or one per class label (``None``: any
    image counts as on time); ``timeout_s`` is the client's total deadline per request.
    """
    if not prompts:
        raise ValueError("no prompts to send")
    own_client = client is None
    client = client or new_client(timeout_s)
    records = []
    tasks = []
    try:
        await _warm_up(client, url)
        t0 = time.monotonic() + _START_LEAD_S
        for i, offset in enumerate(schedule.offsets):
            prompt_id = schedule.prompt_ids[i] if schedule.prompt_ids is not None else i
            request_template = template.for_index(i)
            label = request_template.class_label
            request_slo = slo_s.get(label) if isinstance(slo_s, Mapping) else slo_s
            prompt = prompts[prompt_id % len(prompts)]
            body = request_template.body(prompt, i, request_slo)
            record = RequestRecord(index=i, prompt_id=prompt_id, scheduled_s=offset, status=DROPPED,
                                   slo_s=request_slo, workload_class=label, prompt=prompt, seed=body["seed"],
                                   steps=request_template.num_inference_steps, size=request_template.size or "")
            records.append(record)
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(client, url, body, record, t0, timeout_s, keep_images)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if own_client:
            await client.aclose()
    return records


async def measure_isolated_latency(url: str, prompts: list[str], template: RequestTemplate, *,
                                   count: int = 3, warmup: int = 1, timeout_s: float = 600.0) -> float:
    """Median latency of ``count`` requests sent one at a time, after ``warmup`` discarded ones.

    Raises RuntimeError if any of them fails: an SLO cannot be derived from a server
    that cannot serve a single request.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    latencies = []
    async with new_client(timeout_s) as client:
        for i in range(warmup + count):
            record = RequestRecord(index=i, prompt_id=i, scheduled_s=0.0, status=DROPPED)
            body = template.body(prompts[i % len(prompts)], i, None)
            await send_one(client, url, body, record, time.monotonic(), timeout_s)
            if not record.completed:
                raise RuntimeError(f"isolated request {i} to {url} failed ({record.status}): {record.error}")
            if i >= warmup:
                latencies.append(record.latency_s)
    return statistics.median(latencies)
