"""Concurrent requests through the server give the same pixels as each request alone."""

from __future__ import annotations

import asyncio

from live_server import decode_png, pixel_mismatch
from openai import AsyncOpenAI

NUM_REQUESTS = 20


def request_kwargs(i: int) -> dict:
    steps = (2, 3, 5, 8)[i % 4]
    size = "64x64" if i % 5 == 0 else "32x32"
    return {"prompt": f"a {('red', 'blue', 'green')[i % 3]} circle number {i}", "size": size,
            "extra_body": {"seed": 1000 + i, "num_inference_steps": steps, "guidance_scale": (1.0, 4.0)[i % 2]}}


async def generate_all(api: str, kwargs: list[dict], concurrent: bool) -> list:
    async with AsyncOpenAI(base_url=api, api_key="unused", max_retries=0, timeout=300) as client:
        if concurrent:
            results = await asyncio.gather(*(client.images.generate(**kw) for kw in kwargs))
        else:
            results = [await client.images.generate(**kw) for kw in kwargs]
    return [decode_png(r.data[0].b64_json) for r in results]


def test_concurrent_requests_match_each_request_alone(server):
    kwargs = [request_kwargs(i) for i in range(NUM_REQUESTS)]
    together = asyncio.run(generate_all(server.api, kwargs, concurrent=True))
    alone = asyncio.run(generate_all(server.api, kwargs, concurrent=False))
    mismatched = {i: why for i, (a, b) in enumerate(zip(together, alone)) if (why := pixel_mismatch(a, b))}
    assert not mismatched, f"batched images that differ from the same request alone: {mismatched}"
