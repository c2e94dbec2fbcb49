"""LoRA through HTTP: concurrent requests with different adapters, listing, and clear 4xx answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from live_server import LiveServer, response_image as _image

from glideserve import Engine, GenerationParams
from glideserve.server import ServerConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("http-loras")
    for name, seed in (("style", 1), ("other", 2)):
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                                     adapter_name=name)
        with torch.no_grad():
            for key, param in pipe.transformer.named_parameters():
                if f"lora_B.{name}" in key:
                    param.mul_(4.0)
        StableDiffusion3Pipeline.save_lora_weights(
            out, weight_name=f"{name}.safetensors",
            transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name=name))
    return out


@pytest.fixture(scope="module")
def lora_server(tiny_model, lora_dir):
    with LiveServer(tiny_model, ServerConfig(model_id="tiny"), lora_dir=str(lora_dir)) as live:
        yield live


def _body(lora, seed=3):
    body = {"prompt": "a red circle", "size": "32x32", "seed": seed, "num_inference_steps": 4, "guidance_scale": 3.0}
    if lora is not None:
        body["lora"] = lora
    return body


def test_concurrent_requests_with_different_adapters_each_get_their_own_image(lora_server, tiny_model, lora_dir):
    loras = ["style", [{"name": "other", "scale": 0.5}], [{"name": "style"}, {"name": "other", "scale": 1.5}], None]
    url = f"{lora_server.api}/images/generations"
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda lora: _image(httpx.post(url, json=_body(lora), timeout=120)), loras))
    engine = Engine.from_pretrained(str(tiny_model), lora_dir=str(lora_dir), max_image_side=128)
    for lora, got in zip(loras, images):
        alone = engine.generate([GenerationParams("a red circle", height=32, width=32, seed=3, num_inference_steps=4,
                                                  guidance_scale=3.0, lora=lora or ())])[0]
        assert np.abs(got - np.array(alone.image, dtype=int)).max() <= 2, lora
    assert np.abs(images[0] - images[3]).max() > 10


def test_loras_are_listed_with_what_is_resident(lora_server):
    httpx.post(f"{lora_server.api}/images/generations", json=_body("style"), timeout=120)
    cards = {c["name"]: c for c in httpx.get(f"{lora_server.api}/loras").json()["data"]}
    assert set(cards) == {"style", "other"}
    assert cards["style"]["resident"] and cards["style"]["rank"] == 4
    assert cards["style"]["target_modules"] == sorted(TARGETS)


@pytest.mark.parametrize("lora, status, code", [
    ("missing", 404, "lora_not_found"),
    ("../style", 400, "invalid_request"),
    ([{"name": "style", "scale": 100}], 400, None),
    ([{"name": "style", "weight": 1}], 400, None),
])
def test_bad_lora_requests_get_a_clear_4xx(lora_server, lora, status, code):
    response = httpx.post(f"{lora_server.api}/images/generations", json=_body(lora), timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] is None or "lora" in error["param"]
    if code:
        assert error["code"] == code


@pytest.fixture(scope="module")
def upload_server(tiny_model, lora_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploaded-loras")
    config = ServerConfig(model_id="tiny", lora_uploads=True, max_lora_upload_bytes=256 * 1024)
    with LiveServer(tiny_model, config, lora_dir=str(folder)) as live:
        yield live, folder


def test_an_uploaded_adapter_is_validated_kept_served_and_deleted(upload_server, lora_dir):
    live, folder = upload_server
    data = (lora_dir / "style.safetensors").read_bytes()
    put = httpx.put(f"{live.api}/loras/mine", content=data, timeout=60)
    assert put.status_code == 201, put.text
    assert put.json()["name"] == "mine" and put.json()["rank"] == 4
    assert httpx.put(f"{live.api}/loras/mine", content=data, timeout=60).json()["error"]["code"] == "lora_exists"
    served = _image(httpx.post(f"{live.api}/images/generations", json=_body("mine"), timeout=120))
    plain = _image(httpx.post(f"{live.api}/images/generations", json=_body(None), timeout=120))
    assert np.abs(served - plain).max() > 10
    deleted = httpx.delete(f"{live.api}/loras/mine", timeout=60)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = httpx.post(f"{live.api}/images/generations", json=_body("mine"), timeout=120)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "lora_not_found"
    assert httpx.delete(f"{live.api}/loras/mine", timeout=60).status_code == 404
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("name, content, status", [
    ("pickled", b"\x80\x04\x95" + b"\x00" * 64, 400),              # a pickle renamed: not safetensors
    ("..", b"x", 404),                                              # the URL resolves to no route at all
    (".hidden", b"x", 400),
    ("big", b"\x00" * (256 * 1024 + 1), 413),                       # past --max-lora-upload-mb
])
def test_bad_uploads_get_a_clear_4xx_and_leave_nothing_behind(upload_server, name, content, status):
    live, folder = upload_server
    response = httpx.put(f"{live.api}/loras/{name}", content=content, timeout=60)
    assert response.status_code == status, response.text
    assert [p.name for p in folder.iterdir()] == []


def test_uploads_are_off_unless_the_server_allows_them(lora_server, lora_dir):
    response = httpx.put(f"{lora_server.api}/loras/x", content=b"x", timeout=60)
    assert response.status_code == 403 and response.json()["error"]["code"] == "lora_uploads_disabled"
    assert httpx.delete(f"{lora_server.api}/loras/style", timeout=60).status_code == 403
    assert (lora_dir / "style.safetensors").exists()


def test_a_multipart_upload_is_kept_under_its_file_name_or_the_given_name(upload_server, lora_dir):
    live, folder = upload_server
    data = (lora_dir / "other.safetensors").read_bytes()
    by_file = httpx.post(f"{live.api}/loras", files={"file": ("form-lora.safetensors", data)}, timeout=60)
    assert by_file.status_code == 201, by_file.text
    assert by_file.json()["name"] == "form-lora" and by_file.json()["rank"] == 4
    named = httpx.post(f"{live.api}/loras", files={"file": ("x.safetensors", data)}, data={"name": "chosen"},
                       timeout=60)
    assert named.status_code == 201 and named.json()["name"] == "chosen"
    assert _image(httpx.post(f"{live.api}/images/generations", json=_body("chosen"), timeout=120)).size
    for name in ("form-lora", "chosen"):
        assert httpx.delete(f"{live.api}/loras/{name}", timeout=60).status_code == 200
    assert [p.name for p in folder.iterdir()] == []


@pytest.mark.parametrize("filename, content, form, status", [
    ("../../escape.safetensors", b"x", {}, 400),                   # a traversing file name: its base is '..'-free
    ("ok.safetensors", b"x", {"name": "../escape"}, 400),           # a traversing form name
    ("pickled.safetensors", b"\x80\x04\x95" + b"\x00" * 64, {}, 400),
    ("big.safetensors", b"\x00" * (256 * 1024 + 1), {}, 413),
])
def test_bad_multipart_uploads_get_a_clear_4xx_and_leave_nothing_behind(upload_server, filename, content, form,
                                                                          status):
    live, folder = upload_server
    response = httpx.post(f"{live.api}/loras", files={"file": (filename, content)}, data=form, timeout=60)
    assert response.status_code == status, response.text
    assert [p.name for p in folder.iterdir()] == []
    assert not (folder.parent / "escape.safetensors").exists()
