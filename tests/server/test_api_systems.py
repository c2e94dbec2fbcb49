"""The baseline systems serve behind the same API as the engine (``serve --system``)."""

from __future__ import annotations

import openai
import pytest
from live_server import LiveServer, decode_png

from glideserve.server import ServerConfig


@pytest.mark.parametrize("system", ["diffusers-sequential", "request-batching"])
def test_baseline_serves_the_openai_api(tiny_model, system):
    with LiveServer(tiny_model, ServerConfig(warmup=False), system=system) as live:
        with openai.OpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=120) as client:
            result = client.images.generate(prompt="a cat", n=2, size="64x32",
                                            extra_body={"num_inference_steps": 3, "seed": 5})
            assert [d.model_extra["seed"] for d in result.data] == [5, 6]
            assert decode_png(result.data[0].b64_json).shape == (32, 64, 3)
            events = [e.to_dict() for e in client.images.generate(prompt="a cat", stream=True,
                                                                  extra_body={"num_inference_steps": 3})]
    steps = [e["step"] for e in events if e["type"] == "image_generation.progress" and e["step"] > 0]
    assert steps == [1, 2, 3]
    assert events[-1]["type"] == "image_generation.completed"
