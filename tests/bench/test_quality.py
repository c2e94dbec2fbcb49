"""``glideserve eval quality``: pixel metrics, the exact reference, and optional CLIP / FID."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glideserve.bench import quality, reference_free
from glideserve.errors import ModelLoadError

SIDE = 32


@pytest.fixture(scope="module")
def cli():
    from glideserve.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["eval", "quality", *args])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised CLIP model and processor saved like a downloaded one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from glideserve.models.build import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _gray(level: int, side: int = SIDE) -> Image.Image:
    return Image.fromarray(np.full((side, side, 3), level, dtype=np.uint8))


def _checkerboard_offset(base: int, delta: int, side: int = SIDE) -> Image.Image:
    """``base`` plus or minus ``delta`` in a checkerboard: every pixel is exactly ``delta`` levels off."""
    signs = np.where((np.arange(side)[:, None] + np.arange(side)[None, :]) % 2 == 0, 1, -1)
    pixels = np.repeat((base + delta * signs)[..., None], 3, axis=2).astype(np.uint8)
    return Image.fromarray(pixels)


# -- metric arithmetic -------------------------------------------------------------------------
def test_identical_images_have_ssim_one_and_infinite_psnr_written_as_null():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    result = quality.compare_images(image, image.copy())
    assert result.ssim == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(result.psnr) and result.identical and result.max_abs_diff == 0
    record = result.as_dict()
    assert record["psnr"] is None and record["identical"] is True
    json.dumps(record, allow_nan=False)


def test_psnr_of_known_error_matches_the_analytic_value():
    delta = 4
    result = quality.compare_images(_checkerboard_offset(128, delta), _gray(128))
    mse = (delta / 255.0) ** 2
    assert result.psnr == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-3)
    assert result.max_abs_diff == delta and not result.identical
    assert result.ssim < 1.0


def test_aggregate_psnr_pools_the_squared_error_over_images():
    delta = 10
    images, references = [_gray(90), _checkerboard_offset(90, delta)], [_gray(90), _gray(90)]
    pooled = quality.aggregate_comparison(images, references)
    assert pooled.psnr == pytest.approx(10 * math.log10(1.0 / ((delta / 255.0) ** 2 / 2)), abs=1e-3)
    assert pooled.max_abs_diff == delta
    assert pooled.ssim == pytest.approx((1.0 + quality.compare_images(images[1], references[1]).ssim) / 2, abs=1e-5)


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differs from the reference"):
        quality.compare_images(_gray(0, 32), _gray(0, 16))


def test_toy_cases_spread_over_the_captions_and_repeat_per_seed():
    cases = quality.toy_cases(4, seeds=2)
    assert len(cases) == 8 and {c.seed for c in cases} == {0, 1}
    assert len({c.prompt for c in cases}) == 4
    assert all(c.prompt == f"a {c.fields[0]} {c.fields[1]} on a {c.fields[2]} background" for c in cases)
    with pytest.raises(ValueError, match="168 distinct captions"):
        quality.toy_cases(169, seeds=1)


# -- end to end on a tiny model -------------------------------------------------------------------
def test_systems_match_the_exact_reference_end_to_end(cli, tiny_sd3_dir, tmp_path):
    out = tmp_path / "quality.json"
    result = cli("--model", tiny_sd3_dir, "--system", "glideserve", "--system", "diffusers-sequential",
                 "--toy-captions", "3", "--steps", "2", "--size", f"{SIDE}x{SIDE}", "--json", str(out),
                 "--out-dir", str(tmp_path / "images"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert reference_free.CLIP_SKIPPED in result.output and reference_free.FID_SKIPPED in result.output
    report = json.loads(out.read_text())
    assert [s["system"] for s in report["systems"]] == ["glideserve", "diffusers-sequential"]
    assert report["notes"] == {"clip_score": reference_free.CLIP_SKIPPED, "fid": reference_free.FID_SKIPPED}
    assert report["reference"]["judge_accuracy"] is not None and len(report["reference"]["images"]) == 3
    for system in report["systems"]:
        assert system["num_images"] == 3 and system["ssim"] >= 0.99
        assert (system["psnr"] is None) == system["identical"]
        assert system["identical"] or system["psnr"] > 40
        assert system["judge_accuracy"] is not None and system["clip_score"] is None and system["fid"] is None
        for record in system["images"]:
            assert record["ssim"] >= 0.99 and (record["psnr"] is None) == record["identical"]
            assert set(record["judge"]) == {"read", "correct"}
    # The sequential baseline calls the very pipeline of the reference with the same generator.
    assert report["systems"][1]["identical"]
    for folder in ("reference", "glideserve", "diffusers-sequential"):
        assert len(list((tmp_path / "images" / folder).glob("*.png"))) == 3


def test_a_prompt_file_runs_every_prompt_with_every_seed(cli, tiny_sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nan astronaut on the moon\n")
    out = tmp_path / "quality.json"
    result = cli("--model", tiny_sd3_dir, "--system", "request-batching", "--prompts", str(prompts), "--seeds", "2",
                 "--steps", "2", "--json", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    (system,) = json.loads(out.read_text())["systems"]
    assert system["num_images"] == 4 and system["ssim"] >= 0.99 and system["judge_accuracy"] is None
    assert [(r["prompt"], r["seed"]) for r in system["images"]] == [
        ("a photo of a cat", 0), ("an astronaut on the moon", 0), ("a photo of a cat", 1),
        ("an astronaut on the moon", 1)]


def test_a_perturbed_system_scores_lower(tiny_sd3_dir):
    engine = quality.system_generator("glideserve", tiny_sd3_dir)
    rng = np.random.default_rng(0)

    def noisy(requests, progress=False):
        images = engine(requests, progress)
        return [Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + rng.integers(-40, 41, (*im.size[::-1], 3)),
                                        0, 255).astype(np.uint8)) for im in images]

    cases = quality.prompt_cases(["a photo of a cat", "a red circle"], seeds=1)
    report = quality.run_quality(tiny_sd3_dir, cases, {"glideserve": engine, "noisy": noisy}, steps=2,
                                 size=(SIDE, SIDE), progress=False)
    exact, perturbed = (s.comparison for s in report.systems)
    assert report.systems[0].judge is None  # free-form prompts are not judged
    assert perturbed.ssim < exact.ssim - 0.05
    assert perturbed.psnr < 30 and (exact.identical or exact.psnr > 40)
    assert perturbed.max_abs_diff > exact.max_abs_diff


# -- CLIP score and FID ----------------------------------------------------------------------------
def test_clip_score_from_a_local_folder_matches_the_embedding_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    metrics = reference_free.ReferenceFreeMetrics(clip_model=tiny_clip_dir)
    assert "clip_score" not in metrics.notes and metrics.notes["fid"] == reference_free.FID_SKIPPED
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red circle", "a blue square on a green background", "a photo of a cat"]
    score = metrics.clip_score(images, prompts)

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.inference_mode():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    # torchmetrics clamps the mean at zero, not each pair.
    assert score == pytest.approx(max(float(100 * cosine.mean()), 0.0), abs=1e-3)


def test_missing_or_unloadable_metric_weights_fail_before_generating(cli, tiny_sd3_dir, tmp_path):
    result = cli("--model", tiny_sd3_dir, "--clip-model", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "--clip-model" in result.output and "not a folder" in result.output
    result = cli("--model", tiny_sd3_dir, "--clip-model", tiny_sd3_dir)
    assert result.exit_code == 2 and "could not load a CLIP model" in result.output
    result = cli("--model", tiny_sd3_dir, "--fid-weights", str(tmp_path / "inception.pt"))
    assert result.exit_code == 2 and "--fid-weights" in result.output and "not a file" in result.output
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("not a checkpoint")
    result = cli("--model", tiny_sd3_dir, "--fid-weights", str(not_weights))
    assert result.exit_code == 2 and "not a PyTorch state dict" in result.output


def test_fid_without_its_library_says_what_to_install(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed here")
    weights = tmp_path / "inception.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ModelLoadError, match="pip install torch-fidelity"):
        reference_free.ReferenceFreeMetrics(fid_weights=weights)


def test_bad_options_are_refused(cli, tiny_sd3_dir, tmp_path):
    result = cli("--model", tiny_sd3_dir, "--system", "vllm")
    assert result.exit_code == 2 and "unknown system 'vllm'" in result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    result = cli("--model", tiny_sd3_dir, "--prompts", str(prompts), "--toy-captions", "2")
    assert result.exit_code == 2 and "give one of --prompts" in result.output
    result = cli("--model", tiny_sd3_dir, "--prompts", str(tmp_path / "missing.txt"))
    assert result.exit_code == 2 and "not found" in result.output
