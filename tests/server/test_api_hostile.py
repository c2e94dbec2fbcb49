"""Hostile text in every hand-parsed field is refused with a 400 naming the field, never a 500."""

from __future__ import annotations

import logging

import httpx
import pytest
from hostile_inputs import (BAD_REQUEST_IDS, BAD_SIZES, CONTROL_PROMPTS, GOOD_PROMPTS, GOOD_SIZES,
                            INVISIBLE_PROMPTS)
from pydantic import ValidationError

from glideserve.errors import InvalidRequestError
from glideserve.params import parse_size
from glideserve.server.protocol import ImageGenerationRequest
from glideserve.server.validation import parse_content_length

FAST = {"num_inference_steps": 1}


@pytest.mark.parametrize("size", BAD_SIZES)
def test_parse_size_refuses_everything_outside_the_grammar(size):
    with pytest.raises(InvalidRequestError) as info:
        parse_size(size)
    assert info.value.param == "size" and "ASCII digits" in info.value.message


@pytest.mark.parametrize("size, expected", GOOD_SIZES.items())
def test_parse_size_accepts_the_grammar(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("prompt", INVISIBLE_PROMPTS + CONTROL_PROMPTS)
def test_invisible_or_control_prompts_name_the_field(prompt):
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest(prompt=prompt)
    assert [e["loc"] for e in info.value.errors()] == [("prompt",)]


@pytest.mark.parametrize("prompt", GOOD_PROMPTS)
def test_visible_prompts_are_accepted(prompt):
    assert ImageGenerationRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("field", ["negative_prompt", "user"])
def test_control_characters_are_refused_in_other_text_fields(field):
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="a cat", **{field: "bad\x00"})
    assert getattr(ImageGenerationRequest(prompt="a cat", **{field: ""}), field) == ""


@pytest.mark.parametrize("value, expected", [
    (b"0", 0), (b"123", 123), (b"", None), (b" 12", None), (b"+12", None), (b"1_0", None), (b"-1", None),
    ("٦".encode(), None), ("²".encode(), None), (b"9" * 19, None),
])
def test_content_length_is_plain_ascii_digits(value, expected):
    assert parse_content_length(value) == expected


def post(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.api}/images/generations", json=body, timeout=60, **kwargs)


@pytest.fixture
def no_tracebacks(caplog):
    """Fail if the server logged an error (a traceback means a bug, not a client mistake)."""
    caplog.set_level(logging.ERROR)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_bad_sizes_get_400_over_http(server, no_tracebacks, size):
    response = post(server, {"prompt": "a red circle", "size": size, **FAST})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "size" and error["code"] == "invalid_request"


@pytest.mark.parametrize("prompt", INVISIBLE_PROMPTS + CONTROL_PROMPTS)
def test_bad_prompts_get_400_over_http(server, no_tracebacks, prompt):
    response = post(server, {"prompt": prompt, **FAST})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "invalid_request"


@pytest.mark.parametrize("request_id", BAD_REQUEST_IDS)
def test_bad_request_ids_get_400(server, no_tracebacks, request_id):
    header = post(server, {"prompt": "a cat", **FAST}, headers={"X-Request-Id": request_id.encode()})
    assert header.status_code == 400 and header.json()["error"]["code"] == "invalid_request"
    delete = httpx.delete(f"{server.api}/requests/{request_id}")
    assert delete.status_code in (400, 404), delete.text  # "a/b" is another route: 404
    assert delete.json()["error"]["code"] in ("invalid_request", "not_found")


@pytest.mark.parametrize("image_id", ["img_" + "٦" * 32, "img_" + "A" * 32, "../ready", "img_%00"])
def test_odd_image_ids_are_unknown(server, image_id):
    response = httpx.get(f"{server.api}/images/{image_id}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
