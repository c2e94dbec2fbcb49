"""The soak test's request classes, each recording what it saw in a Tally.

Every action sends one kind of request (or a burst) and records each answer with
the statuses its class allows. Used by ``benchmarks/soak.py``.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
import socket
import sys
import threading
from pathlib import Path

import httpx
import numpy as np

from soak_checks import REFERENCE_PROMPT, Tally

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from hostile_inputs import BAD_REQUEST_IDS, BAD_SIZES, CONTROL_PROMPTS, INVISIBLE_PROMPTS  # noqa: E402

GEN = "/v1/images/generations"
DELETE = "/v1/requests/{request_id}"
IMAGE = "/v1/images/{image_id}"
CONNECTION = "connection"
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle")
MAX_BODY_BYTES = 64 * 1024
LONG_STEPS = 40  # long enough that a cancel at step <= 10 lands well before the end
BURST = 16


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def prompt(rng: random.Random) -> str:
    color, background = rng.sample(COLORS, 2)
    return f"a {color} {rng.choice(SHAPES)} on a {background} background"


def error_code(response: httpx.Response) -> str:
    if response.status_code < 400:
        return "ok"
    try:
        return response.json()["error"]["code"] or "null"
    except (ValueError, KeyError, TypeError):
        return "no-envelope"


class Clients:
    """The actions of the soak; ``url`` is the server, ``keepalive_s`` the client's
    idle keep-alive expiry (kept below the server's so no request races a close)."""

    def __init__(self, url: str, tally: Tally, keepalive_s: float):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.url, self.address, self.tally, self.keepalive_s = url, (host, int(port)), tally, keepalive_s
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None or client.is_closed:
            client = httpx.Client(base_url=self.url, timeout=120,
                                  limits=httpx.Limits(keepalive_expiry=self.keepalive_s))
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def reset_pools(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def scrape(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def reference_image(self) -> np.ndarray:
        color, shape, background = REFERENCE_PROMPT
        body = {"prompt": f"a {color} {shape} on a {background} background", "seed": 1234,
                "num_inference_steps": 20}
        response = httpx.post(f"{self.url}{GEN}", json=body, timeout=120)
        response.raise_for_status()
        return decode(response.json()["data"][0]["b64_json"])

    def _request_id(self) -> str:
        return f"soak-{next(self._ids)}"

    def _record_plain(self, what: str, response: httpx.Response, allowed: set[int]) -> None:
        code = error_code(response)
        generation = "completed" if response.status_code == 200 else code
        images = len(response.json()["data"]) if response.status_code == 200 else 0
        self.tally.answer(what, GEN, response.status_code, code, generation, allowed, images)

    def _post(self, what: str, body: dict, allowed: set[int], headers: dict | None = None,
              pooled: bool = True) -> None:
        """POST a generation; ``pooled=False`` (for short-lived threads) uses its own connection."""
        try:
            if pooled:
                response = self.client().post(GEN, json=body, headers=headers)
            else:
                response = httpx.post(f"{self.url}{GEN}", json=body, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            self.tally.unanswered(what, exc)
            return
        self._record_plain(what, response, allowed)

    # -- request classes --------------------------------------------------------------
    def plain(self, rng: random.Random) -> None:
        body = {"prompt": prompt(rng), "num_inference_steps": rng.randint(2, 8), "seed": rng.randrange(1000),
                "n": rng.choice((1, 1, 2)), "response_format": rng.choice(("b64_json", "url"))}
        self._post("plain", body, {200, 429})

    def burst(self, rng: random.Random) -> None:
        bodies = [{"prompt": prompt(rng), "num_inference_steps": 4} for _ in range(BURST)]
        threads = [threading.Thread(target=self._post, args=("burst", b, {200, 429}, None, False)) for b in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _stream(self, what: str, body: dict, stop_at: int | None = None, delete: bool = False) -> None:
        """A streamed request; ``stop_at`` closes (or with ``delete`` cancels) it after that step."""
        request_id = self._request_id()
        last_step, steps_after_delete, final = 0, 0, None
        try:
            with self.client().stream("POST", GEN, json={**body, "stream": True},
                                      headers={"X-Request-Id": request_id}) as response:
                if response.status_code != 200:
                    response.read()
                    self._record_plain(what, response, {429})
                    return
                deleted = False
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event["type"] == "image_generation.progress" and event["step"] >= 1:
                        steps_after_delete += deleted
                        last_step = event["step"]
                    elif event["type"] in ("image_generation.completed", "error"):
                        final = event
                    if stop_at is not None and last_step >= stop_at and not deleted:
                        if not delete:
                            break  # closes the connection: the server sees a disconnect
                        deleted = True
                        self._delete(request_id)
        except httpx.HTTPError as exc:
            self.tally.unanswered(what, exc)
            return
        if stop_at is not None and not delete and final is None:
            self.tally.either((((GEN, 499, "client_disconnected"), "cancelled"), ((GEN, 200, "ok"), "completed")))
            return
        if final is None:
            self.tally.unanswered(what, RuntimeError("the stream ended without a final event"))
            return
        generation = "completed" if final["type"] == "image_generation.completed" else final["error"]["code"]
        self.tally.answer(what, GEN, 200, "ok", generation, {200}, images=generation == "completed")
        if generation not in ("completed", "cancelled"):
            self.tally.unexpected.append(f"{what}: stream ended with {generation}")

    def cancel_probe(self, rng: random.Random) -> None:
        """On an otherwise idle server: DELETE a slow batch of 8 images after step k and
        count the steps any image still reports afterwards. A step of this batch takes
        tens of milliseconds, far longer than the DELETE's round trip, so more than two
        (the step in flight, and one finished while the DELETE travelled) would mean
        the engine kept working on a cancelled request."""
        request_id, stop_at = self._request_id(), rng.randint(3, 10)
        body = {"prompt": prompt(rng), "n": 8, "size": "128x128", "num_inference_steps": 60,
                "guidance_scale": 4.0, "stream": True}
        before, after, deleted, final = 0, 0, False, None
        with httpx.Client(base_url=self.url, timeout=120) as client:
            with client.stream("POST", GEN, json=body, headers={"X-Request-Id": request_id}) as response:
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event["type"] == "image_generation.progress" and event["step"] >= 1:
                        if deleted:
                            after = max(after, event["step"])
                        else:
                            before = max(before, event["step"])
                    elif event["type"] in ("image_generation.completed", "error"):
                        final = event
                    if before >= stop_at and not deleted:
                        deleted = True
                        self._delete(request_id)
        completed = final is not None and final["type"] == "image_generation.completed"
        self.tally.answer("cancel_probe", GEN, 200, "ok", "completed" if completed else "cancelled", {200})
        if completed or final is None or final["error"]["code"] != "cancelled":
            self.tally.unexpected.append(f"cancel_probe: the stream ended with {final}")
        self.tally.steps_after_delete(max(0, after - before))

    def stream(self, rng: random.Random) -> None:
        self._stream("stream", {"prompt": prompt(rng), "num_inference_steps": rng.randint(2, 8),
                                "partial_images": rng.randint(0, 2)})

    def stream_disconnect(self, rng: random.Random) -> None:
        self._stream("stream_disconnect", {"prompt": prompt(rng), "num_inference_steps": LONG_STEPS},
                     stop_at=rng.randint(1, 10))

    def stream_delete(self, rng: random.Random) -> None:
        self._stream("stream_delete", {"prompt": prompt(rng), "num_inference_steps": LONG_STEPS},
                     stop_at=rng.randint(1, 10), delete=True)

    def _delete(self, request_id: str) -> None:
        try:
            response = httpx.delete(f"{self.url}/v1/requests/{request_id}", timeout=30)
        except httpx.HTTPError as exc:
            self.tally.unanswered("delete", exc)
            return
        self.tally.answer("delete", DELETE, response.status_code, error_code(response), None, {200, 404})

    def plain_delete(self, rng: random.Random) -> None:
        request_id = self._request_id()
        body = {"prompt": prompt(rng), "num_inference_steps": LONG_STEPS}
        thread = threading.Thread(target=self._post, args=("plain_delete", body, {200, 429, 499},
                                                           {"X-Request-Id": request_id}, False))
        thread.start()
        threading.Event().wait(rng.uniform(0.02, 0.3))
        self._delete(request_id)
        thread.join()

    def bad_input(self, rng: random.Random) -> None:
        kind = rng.choice(("size", "invisible", "control", "json", "utf8", "large", "model", "n", "header_id",
                           "delete_id", "route", "method", "image"))
        client = self.client()
        ok_body = {"prompt": "a red circle", "num_inference_steps": 2}
        route, status, code, generation = GEN, 400, "invalid_request", "invalid_request"
        if kind == "size":
            response = client.post(GEN, json={**ok_body, "size": rng.choice(BAD_SIZES)})
        elif kind in ("invisible", "control"):
            response = client.post(GEN, json={**ok_body, "prompt": rng.choice(
                INVISIBLE_PROMPTS if kind == "invisible" else CONTROL_PROMPTS)})
        elif kind in ("json", "utf8"):
            content = b'{"prompt": ' if kind == "json" else b'{"prompt": "\xff\xfe"}'
            response = client.post(GEN, content=content, headers={"content-type": "application/json"})
        elif kind == "large":
            response = client.post(GEN, json={"prompt": "a" * (MAX_BODY_BYTES + 1)})
            status, code, generation = 413, "request_too_large", "request_too_large"
        elif kind == "model":
            response = client.post(GEN, json={**ok_body, "model": "dall-e-3"})
            status, code, generation = 404, "model_not_found", "model_not_found"
        elif kind == "n":
            response = client.post(GEN, json={**ok_body, "n": 9})
        elif kind == "header_id":
            bad = rng.choice(BAD_REQUEST_IDS)
            response = client.post(GEN, json=ok_body, headers={"X-Request-Id": bad.encode()})
        elif kind == "delete_id":
            bad = rng.choice([i for i in BAD_REQUEST_IDS if "/" not in i and "%" not in i])
            response = client.delete(f"/v1/requests/{bad}")
            route, generation = DELETE, None
        elif kind == "route":
            response = client.get("/v1/nothing")
            route, status, code, generation = "unmatched", 404, "not_found", None
        elif kind == "method":
            response = client.put(GEN)
            status, code, generation = 405, "method_not_allowed", None
        else:
            response = client.get("/v1/images/img_" + "٦" * 32)
            route, status, code, generation = IMAGE, 404, "not_found", None
        seen = error_code(response)
        self.tally.answer(f"bad_input/{kind}", route, response.status_code, seen,
                          generation if seen == code else seen, {status})
        if seen != code:
            self.tally.unexpected.append(f"bad_input/{kind}: code {seen}, expected {code}")

    def _raw(self, data: bytes) -> bytes:
        """Send ``data`` and read until the server closes the connection."""
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        return received

    def _slow(self, what: str, data: bytes, kind: str, expected: tuple) -> None:
        try:
            received = self._raw(data)
        except OSError as exc:
            self.tally.unanswered(what, exc)
            return
        status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
        if expected is None:
            if received:
                self.tally.unexpected.append(f"{what}: a silent connection got {received[:40]!r}")
            self.tally.timeout(kind)
            return
        if status != expected[0][1] or expected[0][2].encode() not in received:
            self.tally.unexpected.append(f"{what}: {received[:60]!r}")
        self.tally.timeout(kind, expected)

    def slow_header(self, rng: random.Random) -> None:
        head = f"POST {GEN} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        self._slow("slow_header", head[: rng.randint(1, len(head))].encode(), "header",
                   ((CONNECTION, 408, "header_timeout"), None))

    def slow_body(self, rng: random.Random) -> None:
        head = f"POST {GEN} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        self._slow("slow_body", head.encode() + b'{"prompt": "a red', "body",
                   ((GEN, 408, "body_timeout"), "body_timeout"))

    def silent(self, rng: random.Random) -> None:
        self._slow("silent", b"", "header", None)
