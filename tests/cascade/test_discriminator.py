"""The cascade discriminator: trains on a handful of images, saves as safetensors, separates easy cases."""

from __future__ import annotations

import numpy as np
import pytest

from glideserve.cascade import discriminator, training


def _noise_images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]


def test_small_cnn_learns_real_scenes_from_noise_and_round_trips_through_safetensors(tmp_path):
    captions = training.task_captions(48, seed=0)
    real = training.real_images(captions, seed=1)
    fake = _noise_images(48, seed=2)
    disc = discriminator.build("small-cnn")
    discriminator.train(disc, real[:32], fake[:32], steps=30, batch_size=16, seed=0)
    report = training.evaluate(disc, real[32:], fake[32:], captions[32:])
    assert report["accuracy"] >= 0.9 and report["roc_auc"] >= 0.9
    assert set(report["levels"]) <= {"easy", "medium", "hard"}
    disc.report = report
    folder = disc.save(tmp_path / "disc")
    assert sorted(p.name for p in folder.iterdir()) == ["discriminator.json", "discriminator.safetensors"]
    loaded = discriminator.load(folder)
    np.testing.assert_allclose(loaded.confidence(real[32:]), disc.confidence(real[32:]), atol=1e-6)
    assert loaded.report["roc_auc"] == report["roc_auc"]


def test_roc_auc_is_the_probability_a_real_image_outscores_a_generated_one():
    assert discriminator.roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == pytest.approx(1.0)
    assert discriminator.roc_auc(np.array([0.1, 0.8]), np.array([0.5, 0.2])) == pytest.approx(0.5)


def test_encoder_head_reads_a_local_clip_vision_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "encoder")
    disc = discriminator.build("encoder-head", tmp_path / "encoder")
    before = {k: v.clone() for k, v in disc.network.encoder.state_dict().items()}
    discriminator.train(disc, _noise_images(8, 0), _noise_images(8, 1), steps=2, batch_size=4)
    assert all((before[k] == v).all() for k, v in disc.network.encoder.state_dict().items())  # frozen
    saved = disc.save(tmp_path / "disc")
    assert not any(k.startswith("encoder.") for k in disc.trainable_state())
    scores = discriminator.load(saved).confidence(_noise_images(3, 5))
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(FileNotFoundError, match="CLIP vision folder"):
        discriminator.build("encoder-head", tmp_path / "missing")


def test_loading_a_folder_without_a_discriminator_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-discriminator"):
        discriminator.load(tmp_path)
