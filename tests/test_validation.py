"""Bad input gets a GlideServeError with a message naming the field, never a traceback."""

from __future__ import annotations

import pytest

from glideserve.errors import InvalidRequestError
from glideserve.models.spec import ModelSpec
from glideserve.params import GenerationParams, parse_size

SPEC = ModelSpec(name="t", family="sd3", latent_channels=4, vae_scale_factor=8, patch_size=2, default_height=64,
                 default_width=64, default_steps=20, default_guidance=4.5, samplers=("flow_euler",),
                 default_sampler="flow_euler", max_prompt_tokens=77)


def test_defaults_are_filled_from_the_model():
    p = GenerationParams("a cat").resolve(SPEC)
    assert (p.num_inference_steps, p.guidance_scale, p.height, p.width, p.sampler) == (20, 4.5, 64, 64, "flow_euler")
    assert isinstance(p.seed, int) and p.uses_cfg


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": 3}, "prompt"), ({"negative_prompt": "x" * 5000}, "negative_prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"num_inference_steps": 201}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"), ({"num_inference_steps": True}, "num_inference_steps"),
    ({"guidance_scale": -0.1}, "guidance_scale"), ({"guidance_scale": "high"}, "guidance_scale"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": 1.5}, "seed"),
    ({"height": 63}, "height"), ({"width": 8}, "width"), ({"width": 4096}, "width"),
    ({"sampler": "ddim"}, "sampler"),
])
def test_invalid_fields_name_themselves(kwargs, field):
    params = GenerationParams(**{"prompt": "a cat", **kwargs})
    with pytest.raises(InvalidRequestError) as info:
        params.resolve(SPEC)
    assert info.value.param == field
    assert info.value.message


def test_size_error_suggests_a_valid_size():
    with pytest.raises(InvalidRequestError, match="multiple of 16.*try 64"):
        GenerationParams("a", height=60).resolve(SPEC)


@pytest.mark.parametrize("text, expected", [("64x32", (32, 64)), ("512X768", (768, 512))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["64", "x64", "64x", "-64x64", "axb", "64x64x3", ""])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(InvalidRequestError, match="size"):
        parse_size(text)


def test_sizes_beyond_the_models_position_table_are_refused():
    import dataclasses

    spec = dataclasses.replace(SPEC, max_side=128)
    assert GenerationParams("a", height=128, width=128).resolve(spec).height == 128
    with pytest.raises(InvalidRequestError, match="16..128") as info:
        GenerationParams("a", height=192, width=128).resolve(spec)
    assert info.value.param == "height"
