"""A server started with --compile: warmed-up graphs listed on /v1/models, images served without new compiles."""

from __future__ import annotations

import httpx
from live_server import LiveServer

from glideserve.engine.startup import StartupProgress
from glideserve.server import ServerConfig


class RecordedProgress(StartupProgress):
    """Every snapshot the start-up passes through."""

    def __init__(self):
        super().__init__()
        self.seen: list[dict] = []

    def begin(self, *args, **kwargs) -> None:
        super().begin(*args, **kwargs)
        self.seen.append(self.snapshot())

    def advance(self, *args, **kwargs) -> None:
        super().advance(*args, **kwargs)
        self.seen.append(self.snapshot())


def test_compiled_server_reports_its_graphs_and_serves_within_them(tiny_model):
    progress = RecordedProgress()
    with LiveServer(tiny_model, ServerConfig(model_id="tiny"), compile=True, compile_buckets=(2, 4),
                    max_batch_rows=4, startup=progress) as live:
        # The start-up went through loading, then one step per compiled bucket shape.
        stages = [(s["stage"], s["done"], s["total"]) for s in progress.seen]
        compiling = "compiling the blocks of"
        assert stages[0][0] == "loading"
        assert [s for s in stages if s[0] == compiling] == [(compiling, 0, 2), (compiling, 1, 2), (compiling, 2, 2)]
        assert {s["model"] for s in progress.seen} == {"tiny-sd3"}  # the served name of the model folder
        card = httpx.get(f"{live.api}/models", timeout=30).json()["data"][0]
        assert card["compiled"]["buckets"] == [2, 4]
        assert card["compiled"]["graphs"] == 4  # 2 buckets x (joint block, last block)
        for _ in range(2):
            answer = httpx.post(f"{live.api}/images/generations", timeout=120,
                                json={"prompt": "a cat", "n": 2, "size": "32x32", "num_inference_steps": 3})
            assert answer.status_code == 200, answer.text
        card = httpx.get(f"{live.api}/models", timeout=30).json()["data"][0]
        assert card["compiled"]["graphs"] == 4 and card["compiled"]["eager_calls"] == 0
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
        for line in ('glideserve_compiled_graphs{model="tiny"} 4.0', 'glideserve_compile_seconds{model="tiny"}',
                     'glideserve_compiled_eager_calls_total{model="tiny"} 0.0'):
            assert line in metrics, line
