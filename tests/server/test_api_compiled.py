"""A server started with --compile: warmed-up graphs listed on /v1/models, images served without new compiles."""

from __future__ import annotations

import httpx
from live_server import LiveServer

from glideserve.server import ServerConfig


def test_compiled_server_reports_its_graphs_and_serves_within_them(tiny_model):
    with LiveServer(tiny_model, ServerConfig(model_id="tiny"), compile=True, compile_buckets=(2, 4),
                    max_batch_rows=4) as live:
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
