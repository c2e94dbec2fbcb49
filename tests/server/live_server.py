"""Live servers for the HTTP API tests: in-process (uvicorn thread) or as a subprocess."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from glideserve.server import ServerConfig, create_app

STARTUP_TIMEOUT_S = 120.0
URL_LINE = re.compile(r"at (http://\S+)")


def response_image(response: httpx.Response):
    """The first image of a JSON generation response as an int array (failing with the body otherwise)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become ready in {timeout_s:.0f} s")


class LiveServer:
    """The real app and backend (``system``) under uvicorn on a background thread of this process.

    ``model`` is one model, or a list of ``NAME=PATH`` models served together; ``cascade`` (a
    ``CascadeConfig`` over two of them) serves them as a cascade.

    ``app`` gives tests access to the server state (for instance to add a step
    listener to the engine); ``url`` is the base URL and ``api`` the ``/v1`` root.
    """

    def __init__(self, model: str | Path | list[str], config: ServerConfig = ServerConfig(),
                 system: str = "glideserve", cascade=None, data_dir: Path | None = None, **engine_config):
        from glideserve.cli.serve import System, make_backend
        from glideserve.server.run import DrainingServer, uvicorn_config

        engine_config.setdefault("max_image_side", 128)
        self.backend = make_backend(System(system), model if isinstance(model, list) else str(model),
                                    **engine_config)
        if cascade is not None:  # a CascadeConfig over two of the served models
            from glideserve.cascade.serving import build_cascade_backend

            self.backend = build_cascade_backend(self.backend, cascade, config.default_slo_ms)
        if data_dir is not None:  # fine-tuning jobs on the datasets there
            self.backend.attach_fine_tuning(str(data_dir))
        self.app = create_app(self.backend, config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/v1"
        self._server = DrainingServer(uvicorn_config(self.app, "127.0.0.1", self.port, "warning"), self.app)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def call(self, coroutine, timeout_s: float = 120.0):
        """Run ``coroutine`` on the server's event loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._server._loop).result(timeout_s)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


class ServerProcess:
    """``python -m glideserve serve`` as a subprocess; ``url`` is parsed from its ready line."""

    def __init__(self, model: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glideserve", "serve", "--model", str(model), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.log: list[str] = []
        self.url = self._wait_for_url()
        self._reader = threading.Thread(target=self._drain_output, daemon=True)
        self._reader.start()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for line in self.proc.stdout:
            self.log.append(line)
            match = URL_LINE.search(line) if line.startswith("glideserve: serving") else None
            if match:
                return match.group(1)
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("server did not report ready:\n" + "".join(self.log))

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def decode_png(b64: str):
    """The RGB pixels of a base64 PNG as a uint8 array (and a check that it is a PNG)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    if image.format != "PNG":
        raise AssertionError(f"expected a PNG, got {image.format}")
    return np.asarray(image.convert("RGB"))


# A request batched with others runs the same arithmetic in a different accumulation
# order (CPU matmul kernels are chosen per batch shape), so a float32 value can land on
# the other side of an 8-bit rounding boundary: measured, about one pixel channel in
# ten thousand differs, by exactly 1. Anything beyond one rounding step is a real bug.
ROUNDING_TOLERANCE = 1
MAX_ROUNDED_FRACTION = 0.001


def pixel_mismatch(a, b) -> str | None:
    """Why two images are not the same up to 8-bit rounding, or None when they are."""
    import numpy as np

    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    if diff.max() > ROUNDING_TOLERANCE or (diff > 0).mean() > MAX_ROUNDED_FRACTION:
        return f"max difference {int(diff.max())}, {int((diff > 0).sum())} of {diff.size} values differ"
    return None


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def browser_marks() -> list:
    """pytest marks of a browser test: Debian's chromium and the playwright package, or a skip saying which."""
    import importlib.util

    import pytest

    return [pytest.mark.browser,
            pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                               "(apt-get install -y chromium)"),
            pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                               reason="needs the playwright Python package (pip install playwright)")]


def launch_chromium(playwright):
    """The system Chromium, headless, with no background traffic (no browser download involved)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
