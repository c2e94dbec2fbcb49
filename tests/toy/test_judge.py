import numpy as np
import pytest

from glideserve.toy import dataset, judge


def test_judge_reads_dataset_images():
    samples = dataset.random_samples(3 * 168, seed=11)
    verdicts = [judge.judge_image(image) for image in dataset.render_batch(samples)]
    acc = judge.accuracy(verdicts, [(s.color, s.shape, s.background) for s in samples])
    assert acc["all"] >= 0.99, acc


def test_judge_tolerates_blur_and_noise_like_a_decoder_makes():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    samples = dataset.random_samples(168, seed=12)
    verdicts = []
    for image in dataset.render_batch(samples):
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
        verdicts.append(judge.judge_image(noisy))
    acc = judge.accuracy(verdicts, [(s.color, s.shape, s.background) for s in samples])
    assert acc["all"] >= 0.95, acc


def test_judge_rejects_wrong_captions():
    sample = dataset.ShapeSample("red", "circle", "blue", size=34.0, center_x=31.0, center_y=33.0)
    verdict = judge.judge_image(dataset.render(sample))
    assert verdict.matches("red", "circle", "blue") == {"background": True, "color": True, "shape": True}
    assert verdict.matches("blue", "square", "red") == {"background": False, "color": False, "shape": False}


def test_plain_image_has_no_shape():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = dataset.COLORS["green"]
    verdict = judge.judge_image(image)
    assert verdict.background == "green" and verdict.color is None and verdict.shape is None


def test_noise_image_scores_near_chance():
    rng = np.random.default_rng(1)
    combos = dataset.all_combinations()
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in combos]
    acc = judge.accuracy([judge.judge_image(i) for i in images], combos)
    assert acc["all"] < 0.1, acc


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="RGB"):
        judge.judge_image(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="one expected"):
        judge.accuracy([], [])
