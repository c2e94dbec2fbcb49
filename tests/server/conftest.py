"""Fixtures for the HTTP server tests: a tiny SD3 model on disk and a live server around it."""

from __future__ import annotations

from pathlib import Path

import pytest
from live_server import LiveServer

from glideserve.server import ServerConfig


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD3 pipeline saved in the diffusers folder layout."""
    from glideserve.models.build import build_sd3_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sd3"
    build_sd3_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model):
    with LiveServer(tiny_model, ServerConfig(model_id="tiny")) as live:
        yield live


@pytest.fixture
def openai_client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120) as client:
        yield client
