"""Per-row LoRA: rows with different adapters (or none) in one batched forward, each equal to diffusers alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from glideserve import Engine, GenerationParams, GenerationResult
from glideserve.errors import InvalidRequestError, LoraNotFoundError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _make_lora(model_dir, out_dir, name: str, seed: int, rank: int = 4, alpha: int = 8) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                            init_lora_weights=False), adapter_name=name)
    with torch.no_grad():  # random B weights large enough that each adapter visibly changes the image
        for key, param in pipe.transformer.named_parameters():
            if f"lora_B.{name}" in key:
                param.mul_(4.0)
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir, weight_name=f"{name}.safetensors",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name=name),
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": TARGETS})


@pytest.fixture(scope="module")
def lora_dir(tiny_sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    _make_lora(tiny_sd3_dir, out, "a", seed=1)
    _make_lora(tiny_sd3_dir, out, "b", seed=2, rank=2, alpha=2)
    return out


def _reference(model_dir, lora_dir, params: GenerationParams, loras):
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(lora_dir, weight_name=f"{name}.safetensors", adapter_name=name)
    if loras:
        pipe.set_adapters([n for n, _ in loras], [s for _, s in loras])
    return pipe(params.prompt, num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                height=params.height, width=params.width, max_sequence_length=16,
                generator=torch.Generator("cpu").manual_seed(params.seed)).images[0]


def test_rows_with_different_adapters_share_forwards_and_each_equals_diffusers(tiny_sd3_dir, lora_dir):
    cases = {"a": ["a"], "b": [("b", 1.0)], "ab": [{"name": "a", "scale": 0.7}, {"name": "b", "scale": 1.3}],
             "none": []}
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir))
    params = {rid: GenerationParams("a red circle", num_inference_steps=5, guidance_scale=3.0, seed=7,
                                    height=32, width=32, lora=lora, request_id=rid) for rid, lora in cases.items()}
    for p in params.values():
        engine.add_request(p)
    results, batch_sizes = {}, []
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, GenerationResult):
                results[event.request_id] = event
        batch_sizes.append(engine.core.last_step.num_requests)
    assert max(batch_sizes) == 4  # all four rows of adapters in one forward
    images = {}
    for rid, p in params.items():
        got = np.array(results[rid].image, dtype=int)
        want = np.array(_reference(tiny_sd3_dir, lora_dir, p, results[rid].params.lora), dtype=int)
        assert np.abs(got - want).max() <= 2, rid
        images[rid] = got
    assert all(np.abs(images[r] - images["none"]).max() > 10 for r in ("a", "b", "ab"))  # adapters do something


def test_lora_names_are_validated_and_confined(tiny_sd3_dir, lora_dir, tmp_path):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir))
    with pytest.raises(LoraNotFoundError):
        engine.add_request(GenerationParams("x", lora="missing"))
    for bad in ("../a", "a/b", "", ".hidden", [{"name": "a", "scale": 99}], ["a", "a"], {"name": "a"}, 5):
        with pytest.raises(InvalidRequestError):
            engine.add_request(GenerationParams("x", lora=bad))
    (lora_dir / "pickle.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(InvalidRequestError, match="not a readable safetensors"):
        engine.add_request(GenerationParams("x", lora="pickle"))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((lora_dir / "a.safetensors").read_bytes())
    (lora_dir / "escape.safetensors").symlink_to(outside)
    with pytest.raises(InvalidRequestError, match="outside the LoRA directory"):
        engine.add_request(GenerationParams("x", lora="escape"))
    plain = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    with pytest.raises(InvalidRequestError, match="--lora-dir"):
        plain.add_request(GenerationParams("x", lora="a"))


def test_resident_adapters_stay_within_their_memory_budget(tiny_sd3_dir, lora_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir))
    store = engine.core.runner.loras
    a, b = store.get("a"), store.get("b")
    assert store.memory.used == a.nbytes + b.nbytes
    tight = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir),
                                   lora_memory_mb=(a.nbytes + b.nbytes - 1) / 2**20).core.runner.loras
    tight.get("a")
    tight.get("b")  # both do not fit: the least recently used goes
    assert [card["name"] for card in tight.describe() if card["resident"]] == ["b"]
    assert tight.memory.used == b.nbytes <= tight.memory.budget_bytes
    tiny = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir),
                                  lora_memory_mb=(b.nbytes - 1) / 2**20)
    with pytest.raises(InvalidRequestError, match="--lora-memory-mb"):
        tiny.add_request(GenerationParams("x", lora="b"))


def test_a_lora_for_another_architecture_is_a_clear_400(tiny_sd3_dir, tiny_sd15_dir, lora_dir):
    unet = Engine.from_pretrained(tiny_sd15_dir, lora_dir=str(lora_dir))
    with pytest.raises(InvalidRequestError, match="only denoiser and text-encoder LoRAs for this model"):
        unet.add_request(GenerationParams("x", lora="a"))


def test_lora_rows_keep_their_own_feature_cache(tiny_sd3_dir, lora_dir):
    """A cached LoRA row reuses its own features: batched with a plain cached row, it gets its image alone."""
    def run(params):
        engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(lora_dir))
        return {r.request_id: r for r in engine.generate(params)}

    base = dict(num_inference_steps=6, guidance_scale=3.0, seed=3, height=32, width=32, cache="glideserve:2")
    both = run([GenerationParams("a red circle", lora="a", request_id="l", **base),
                GenerationParams("a red circle", request_id="p", **base)])
    alone = run([GenerationParams("a red circle", lora="a", request_id="l", **base)])["l"]
    assert both["l"].timings.cached_steps == 4
    assert np.abs(np.array(both["l"].image, dtype=int) - np.array(alone.image, dtype=int)).max() <= 2
    assert np.abs(np.array(both["l"].image, dtype=int) - np.array(both["p"].image, dtype=int)).max() > 10


def _kohya_twin(diffusers_file, out_file, alpha: float) -> None:
    """The same adapter under kohya/civitai key names, as a single file (``lora_down``/``lora_up``/``alpha``)."""
    from safetensors.torch import load_file, save_file

    kohya = {}
    for key, value in load_file(diffusers_file).items():
        module, _, which = key.removeprefix("unet.").rpartition(".lora_")
        base = "lora_unet_" + module.replace(".", "_")
        kohya[f"{base}.lora_down.weight" if which.startswith("A") else f"{base}.lora_up.weight"] = value
        kohya[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(kohya, out_file)


def test_unet_rows_with_a_lora_its_kohya_twin_and_none_equal_diffusers(tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                          adapter_name="u")
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name="u.safetensors",
                                              unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="u"),
                                              unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8,
                                                                          "target_modules": TARGETS})
    _kohya_twin(tmp_path / "u.safetensors", tmp_path / "civitai-style.safetensors", alpha=8.0)
    engine = Engine.from_pretrained(tiny_sd15_dir, lora_dir=str(tmp_path))
    base = dict(num_inference_steps=4, guidance_scale=5.0, seed=9)
    got = {r.request_id: np.array(r.image, dtype=int) for r in engine.generate([
        GenerationParams("a cat", lora="u", request_id="u", **base),
        GenerationParams("a cat", lora="civitai-style", request_id="k", **base),
        GenerationParams("a cat", request_id="n", **base)])}
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    reference.set_progress_bar_config(disable=True)

    def call():
        return np.array(reference("a cat", num_inference_steps=4, guidance_scale=5.0,
                                  generator=torch.Generator("cpu").manual_seed(9)).images[0], dtype=int)

    plain = call()
    reference.load_lora_weights(tmp_path, weight_name="u.safetensors", adapter_name="u")
    adapted = call()
    assert np.abs(adapted - plain).max() > 10  # the adapter changes the image
    for rid, want in (("u", adapted), ("k", adapted), ("n", plain)):
        assert np.abs(got[rid] - want).max() <= 2, rid


def _merged_pipeline(model_dir, lora_file, scalings: dict[str, float]):
    """The pipeline with each adapter layer merged into its base weight: W + scaling * B A."""
    from safetensors.torch import load_file

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    tensors = load_file(lora_file)
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            component, _, rest = key.partition(".")
            path = rest.removesuffix(".lora_A.weight")
            layer = getattr(pipe, component).get_submodule(path)
            layer.weight += scalings[component] * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
    return pipe


def test_text_encoder_loras_change_only_their_own_rows_prompts(tiny_sd3_dir, tmp_path):
    """A LoRA on the transformer and the first CLIP text encoder: its rows equal diffusers; a plain row with the
    same prompt, encoded in the same prefill, gets the plain embedding (the prompt cache keys on adapters)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    torch.manual_seed(3)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                                 adapter_name="t")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                       init_lora_weights=False), pipe.text_encoder, adapter_name="t")
    with torch.no_grad():
        for module in (pipe.transformer, pipe.text_encoder):
            for key, param in module.named_parameters():
                if "lora_B.t" in key:
                    param.mul_(4.0)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, weight_name="t.safetensors",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="t"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="t"),
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 4, "target_modules": TARGETS},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 8,
                                            "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]})
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(tmp_path))
    params = {rid: GenerationParams("a red circle", num_inference_steps=4, guidance_scale=3.0, seed=7, height=32,
                                    width=32, lora=lora, request_id=rid) for rid, lora in (("t", "t"), ("n", ()))}
    got = {r.request_id: np.array(r.image, dtype=int) for r in engine.generate(list(params.values()))}
    # Reference: diffusers' pipeline with the adapter merged into its weights (W + alpha/r * B A). diffusers'
    # own text-encoder LoRA loader needs a newer peft than this environment has.
    merged = _merged_pipeline(tiny_sd3_dir, tmp_path / "t.safetensors", {"transformer": 1.0, "text_encoder": 2.0})
    plain = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    for rid, reference in (("t", merged), ("n", plain)):
        reference.set_progress_bar_config(disable=True)
        p = params[rid]
        want = np.array(reference(p.prompt, num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                                  max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(7)).images[0],
                        dtype=int)
        assert np.abs(got[rid] - want).max() <= 2, rid
    assert np.abs(got["t"] - got["n"]).max() > 10
    adapter = engine.core.runner.loras.get("t")
    assert set(adapter.text_layers) == {"text_encoder"}


def test_a_lora_made_for_another_model_of_the_same_family_is_refused_at_admission(tiny_sd3_dir, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from glideserve.models.build import SD3Dims, build_sd3_pipeline

    other = build_sd3_pipeline(SD3Dims(heads=4))  # same layer names, wider layers
    other.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS), adapter_name="w")
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, weight_name="wide.safetensors",
        transformer_lora_layers=get_peft_model_state_dict(other.transformer, adapter_name="w"))
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, lora_dir=str(tmp_path))
    with pytest.raises(InvalidRequestError, match="made for another model"):
        engine.add_request(GenerationParams("x", lora="wide"))
    assert not engine.has_unfinished()
