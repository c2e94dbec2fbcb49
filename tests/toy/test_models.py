import json

import numpy as np
import pytest
import torch

from glideserve.models.loading import bundled_model_dir
from glideserve.toy import dataset, judge, recipe, scene_judge, scenes

# Every 14th combination: 12 captions spanning all shapes, colours and backgrounds.
SUBSET = dataset.all_combinations()[::14]
THRESHOLDS = {"glide-small": 0.75, "glide-tiny": 0.5}


def _adherence(pipe, serving: dict) -> dict[str, float]:
    images = pipe([dataset.caption(*c) for c in SUBSET], num_inference_steps=serving["default_steps"],
                  guidance_scale=serving["default_guidance"], height=64, width=64,
                  max_sequence_length=serving["max_sequence_length"],
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return judge.accuracy([judge.judge_image(p) for p in pixels], SUBSET)


@pytest.mark.parametrize("name", ["glide-small", "glide-tiny"])
def test_shipped_model_follows_captions_and_an_untrained_one_does_not(name):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = bundled_model_dir(name)
    serving = json.loads((folder / "serving.json").read_text())
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    trained = _adherence(pipe, serving)
    assert trained["all"] >= THRESHOLDS[name], trained

    torch.manual_seed(0)
    untrained_transformer = SD3Transformer2DModel.from_config(pipe.transformer.config).eval()
    untrained = StableDiffusion3Pipeline(**{**pipe.components, "transformer": untrained_transformer})
    untrained.set_progress_bar_config(disable=True)
    random_scores = _adherence(untrained, serving)
    assert random_scores["all"] < THRESHOLDS[name], random_scores


SCENE_MODELS = ["glide-base", "glide-turbo"]
# Per difficulty: the least all-correct a shipped scenes model must keep on a fixed caption sample.
SCENE_FLOORS = {"glide-base": {"easy": 0.75, "medium": 0.4}, "glide-turbo": {"easy": 0.75, "medium": 0.2}}


def _scene_adherence(pipe, serving: dict, per_level: int = 6) -> dict[str, float]:
    captions = [c for level in scenes.evaluation_captions(per_level, seed=1).values() for c in level]
    images = pipe(captions, num_inference_steps=serving["default_steps"], guidance_scale=serving["default_guidance"],
                  height=64, width=64, max_sequence_length=serving["max_sequence_length"],
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    summary = scene_judge.summarize(captions, [scene_judge.score(p, c) for p, c in zip(pixels, captions)])
    return {level: row["all"] for level, row in summary.items()}


@pytest.mark.parametrize("name", SCENE_MODELS)
def test_shipped_scene_model_follows_captions_per_level_and_an_untrained_one_does_not(name):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = bundled_model_dir(name)
    serving = json.loads((folder / "serving.json").read_text())
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)  # offline: a local folder, nothing fetched
    pipe.set_progress_bar_config(disable=True)
    trained = _scene_adherence(pipe, serving)
    for level, floor in SCENE_FLOORS[name].items():
        assert trained[level] >= floor, (level, trained)

    torch.manual_seed(0)
    untrained_transformer = SD3Transformer2DModel.from_config(pipe.transformer.config).eval()
    untrained = StableDiffusion3Pipeline(**{**pipe.components, "transformer": untrained_transformer})
    untrained.set_progress_bar_config(disable=True)
    random_scores = _scene_adherence(untrained, serving)
    assert random_scores["overall"] < 0.1, random_scores


@pytest.mark.parametrize("name", ["glide-small", "glide-tiny", *SCENE_MODELS])
def test_shipped_folder_layout(name):
    folder = bundled_model_dir(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    serving = json.loads((folder / "serving.json").read_text())
    assert serving == recipe.serving_defaults(recipe.preset(name.removeprefix("glide-")))
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # Truncation would cut the EOS token whose state is CLIP's pooled output.
    task = recipe.preset(name.removeprefix("glide-")).task
    assert recipe.clip_max_length(task) <= tokenizer.model_max_length
    weights = [p for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_shipped_weights_are_small_and_tiny_is_much_lighter():
    from diffusers import SD3Transformer2DModel

    total = sum(p.stat().st_size for name in ("glide-small", "glide-tiny")
                for p in bundled_model_dir(name).rglob("*.safetensors"))
    assert total < 60 * 2**20
    small, tiny = (SD3Transformer2DModel.from_pretrained(bundled_model_dir(n), subfolder="transformer")
                   for n in ("glide-small", "glide-tiny"))
    assert recipe.parameter_count(small) >= 3 * recipe.parameter_count(tiny)
