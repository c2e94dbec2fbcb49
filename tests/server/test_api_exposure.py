"""What the server reveals and to whom: image URLs never built from the Host header,
image ids kept out of the access log, the 401's auth scheme, no CDN-backed docs by default."""

from __future__ import annotations

import logging

import httpx
import pytest
from live_server import LiveServer

from glideserve.server import ServerConfig, create_app
from glideserve.server.accounting import RedactImageIds

FAST = {"prompt": "a red circle", "num_inference_steps": 1, "response_format": "url"}


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.1:1@evil.example", "[::1]"])
def test_image_urls_ignore_the_host_header(server, host):
    response = httpx.post(f"{server.api}/images/generations", json=FAST, headers={"Host": host}, timeout=60)
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("/v1/images/img_") and "evil" not in url
    assert httpx.get(server.url + url).status_code == 200


def test_public_url_is_the_base_of_image_urls(tiny_model):
    config = ServerConfig(public_url="https://images.example.com/", warmup=False)
    with LiveServer(tiny_model, config) as live:
        response = httpx.post(f"{live.api}/images/generations", json=FAST, headers={"Host": "evil.example"},
                              timeout=60)
        url = response.json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/v1/images/img_")
        assert httpx.get(live.url + url.removeprefix("https://images.example.com")).status_code == 200
        assert httpx.get(f"{live.url}/docs").status_code == 404  # off by default


@pytest.mark.parametrize("url", ["ftp://x", "https://x/?q=1", "https://x/#f", "images.example.com", "https://",
                                 "https://exa mple.com", "javascript:alert(1)"])
def test_public_url_must_be_a_plain_base(url):
    with pytest.raises(ValueError, match="public-url"):
        ServerConfig(public_url=url)


def test_access_log_redacts_image_ids():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/images/img_" + "ab" * 16, "1.1", 200), None)
    assert RedactImageIds().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /v1/images/<redacted> HTTP/1.1" 200'


def test_the_access_log_filter_is_installed(server):
    assert any(isinstance(f, RedactImageIds) for f in logging.getLogger("uvicorn.access").filters)


def test_401_names_the_bearer_scheme(tiny_model):
    with LiveServer(tiny_model, ServerConfig(api_key="k", warmup=False)) as live:
        for response in (httpx.post(f"{live.api}/images/generations", json=FAST),
                         httpx.get(f"{live.api}/models", headers={"Authorization": "Bearer nope"})):
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_docs_are_served_only_when_asked():
    from fastapi.testclient import TestClient

    class Spec:
        name = "fake"

    class Backend:
        spec = Spec()

        def stats(self):
            raise AssertionError("not scraped here")

    with_docs = TestClient(create_app(Backend(), ServerConfig(docs=True, warmup=False)))
    assert with_docs.get("/docs").status_code == 200
    without = TestClient(create_app(Backend(), ServerConfig(warmup=False)))
    assert without.get("/docs").status_code == 404 and without.get("/redoc").status_code == 404
    assert without.get("/openapi.json").status_code == 200  # the schema itself is local
