"""The server listens while its models load: /ready reports the start-up's progress, other routes 503."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
from live_server import free_port, wait_ready

from glideserve.engine.startup import StartupProgress
from glideserve.server import ServerConfig
from glideserve.server.loading import LoadingApp
from glideserve.server.run import DrainingServer, uvicorn_config


class LoadingServer:
    """A LoadingApp under uvicorn on a background thread, with ``load`` as its backend loader."""

    def __init__(self, load, config: ServerConfig = ServerConfig(model_id="tiny")):
        self.failures: list[BaseException] = []
        self.ready = threading.Event()
        self.app = LoadingApp(load, config, on_ready=self.ready.set, on_failure=self.failures.append)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = DrainingServer(uvicorn_config(self.app, "127.0.0.1", port, "warning"), self.app)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LoadingServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # listening, whatever the load is doing
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("the server did not start listening")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def test_ready_reports_the_startup_while_the_backend_loads_then_the_server_serves(tiny_model):
    from glideserve.cli.serve import System, make_backend

    release = threading.Event()

    def load(progress: StartupProgress):
        progress.begin("compiling the blocks of", "tiny", total=3, unit="bucket shapes")
        progress.advance(1, "last: 1 rows at 32x32 in 0.1 s")
        if not release.wait(60):
            raise TimeoutError("the test never released the load")
        return make_backend(System.glideserve, str(tiny_model), max_image_side=128, startup=progress)

    with LoadingServer(load) as live:
        assert httpx.get(f"{live.url}/health", timeout=5).json()["status"] == "ok"
        ready = httpx.get(f"{live.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        body = ready.json()
        assert body["error"]["code"] == "not_ready"
        assert "compiling the blocks of tiny: 1 of 3 bucket shapes" in body["error"]["message"]
        assert body["startup"]["done"] == 1 and body["startup"]["total"] == 3
        early = httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a cat"}, timeout=5)
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert "GET /ready" in early.json()["error"]["message"] and early.headers["retry-after"] == "5"
        assert httpx.get(f"{live.url}/v1/models", timeout=5).status_code == 503

        release.set()
        wait_ready(live.url)
        assert live.ready.is_set() and not live.failures
        answer = httpx.post(f"{live.url}/v1/images/generations", timeout=120,
                            json={"prompt": "a cat", "size": "32x32", "num_inference_steps": 2})
        assert answer.status_code == 200, answer.text
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
        # The connections of the loading phase are counted in the served app's registry.
        accepted = next(float(line.split()[1]) for line in metrics.splitlines()
                        if line.startswith("glideserve_connections_total"))
        assert accepted >= 7


def test_a_failed_load_is_reported_on_ready_and_handed_to_the_caller():
    def load(progress: StartupProgress):
        progress.begin("loading", "broken")
        raise ValueError("model 'broken' has no transformer; pass a diffusers folder")

    with LoadingServer(load) as live:
        deadline = time.monotonic() + 30
        while not live.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [str(e) for e in live.failures] == ["model 'broken' has no transformer; pass a diffusers folder"]
        ready = httpx.get(f"{live.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "load_failed"
        assert "has no transformer" in ready.json()["error"]["message"]


def test_a_shutdown_signal_during_the_load_stops_the_server_at_once():
    never = threading.Event()

    def load(progress: StartupProgress):
        never.wait(600)  # a compile that would take ten minutes
        raise TimeoutError("unreachable")

    live = LoadingServer(load).__enter__()
    start = time.monotonic()
    live.server.handle_exit(signal.SIGTERM, None)
    live.thread.join(timeout=30)
    assert not live.thread.is_alive() and time.monotonic() - start < 15
    never.set()


class SlowStartBackend:
    """A real backend whose ``start`` waits for ``gate``: the moment between the load and serving."""

    def __init__(self, backend, gate: threading.Event):
        self._backend, self._gate = backend, gate

    async def start(self) -> None:
        await asyncio.to_thread(self._gate.wait, 60)
        await self._backend.start()

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_ready_answers_503_while_the_loaded_backend_starts(tiny_model):
    from glideserve.cli.serve import System, make_backend

    gate = threading.Event()

    def load(progress: StartupProgress):
        backend = make_backend(System.glideserve, str(tiny_model), max_image_side=128, startup=progress)
        return SlowStartBackend(backend, gate)

    with LoadingServer(load) as live:
        deadline = time.monotonic() + 60
        while live.app.app is None and time.monotonic() < deadline:  # loaded, its lifespan not entered yet
            ready = httpx.get(f"{live.url}/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready", ready.text
            if ready.json()["startup"]["stage"] == "starting the engine loop":
                break
            time.sleep(0.05)
        assert ready.json()["startup"]["stage"] == "starting the engine loop"
        assert httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a cat"}, timeout=5).status_code == 503
        gate.set()
        wait_ready(live.url)
        assert live.ready.is_set() and not live.failures
