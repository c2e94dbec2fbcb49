import json

import torch

from typer.testing import CliRunner

from glideserve.cli import app
from glideserve.models.loading import bundled_model_dir

runner = CliRunner()


def test_train_toy_writes_a_loadable_sd3_folder(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "model"
    result = runner.invoke(app, ["train-toy", "--size", "tiny", "--steps", "2", "--out", str(out), "--threads", "1",
                                 "--vae-from", str(bundled_model_dir("glide-tiny")), "--samples-per-caption", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "serving.json").read_text())["default_steps"] == 20
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == 3

    resumed = runner.invoke(app, ["train-toy", "--size", "tiny", "--steps", "3", "--out", str(out), "--threads", "1",
                                  "--resume", "--samples-per-caption", "1"])
    assert resumed.exit_code == 0, resumed.output
    for config in out.rglob("config.json"):  # the reused VAE's source folder is not written into the model
        assert str(tmp_path) not in config.read_text() and "glide-tiny" not in config.read_text(), config


def test_train_toy_base_trains_its_text_encoders_too_and_resumes(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "base"
    base = bundled_model_dir("glide-base")
    args = ["train-toy", "--size", "base", "--out", str(out), "--threads", "1", "--scene-samples", "32"]
    result = runner.invoke(app, [*args, "--steps", "2", "--init-from", str(base)])
    assert result.exit_code == 0, result.output
    resumed = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 3
    start, trained = StableDiffusion3Pipeline.from_pretrained(base), StableDiffusion3Pipeline.from_pretrained(out)
    for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # the encoders learned, EMA included
        before, after = getattr(start, key).state_dict(), getattr(trained, key).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), key
    assert trained.transformer.config.num_layers == 8


def test_train_toy_rejects_bad_options(tmp_path):
    result = runner.invoke(app, ["train-toy", "--size", "huge", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "small, tiny" in result.output
    result = runner.invoke(app, ["train-toy", "--steps", "5", "--minutes", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["train-toy", "--vae-steps", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "must be positive" in result.output
    result = runner.invoke(app, ["train-toy", "--steps", "5", "--resume", "--out", str(tmp_path / "none")])
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_eval_judge_reports_accuracy_through_the_engine(tmp_path):
    report_file, grid_file = tmp_path / "judge.json", tmp_path / "grid.png"
    result = runner.invoke(app, ["eval", "judge", "--model", "glide-tiny", "--task", "shapes", "--steps", "4",
                                 "--seeds", "1", "--every", "21", "--json", str(report_file), "--grid",
                                 str(grid_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["num_images"] == 8 and report["steps"] == 4
    assert set(report["accuracy"]) == {"background", "color", "shape", "all"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert grid_file.stat().st_size > 0


def test_eval_judge_scores_each_difficulty_of_the_scenes(tmp_path):
    report_file = tmp_path / "scenes.json"
    result = runner.invoke(app, ["eval", "judge", "--model", "glide-tiny", "--steps", "2", "--seeds", "1",
                                 "--per-level", "3", "--no-toy-clip", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["num_images"] == 9 and set(report["levels"]) == {"easy", "medium", "hard", "overall"}
    assert set(report["levels"]["hard"]) >= {"position", "binding", "all", "n"}
    assert "hard" in result.output and "binding" in result.output


def test_eval_quality_scores_scene_captions_per_level(tmp_path):
    report_file = tmp_path / "quality.json"
    result = runner.invoke(app, ["eval", "quality", "--model", "glide-tiny", "--scene-captions", "2", "--steps", "2",
                                 "--threads", "1", "--no-progress", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    engine = report["systems"][0]
    assert engine["ssim"] > 0.99  # the engine against diffusers' pipeline
    for level in ("easy", "medium", "hard", "overall"):
        row = engine["levels"][level]
        assert 0 <= row["all"] <= 1 and row["toy_clip_score"] >= 0 and row["toy_fid"] >= 0
    assert "toy CLIP score" in result.output


def test_train_toy_turbo_distills_a_loadable_two_step_model_and_resumes(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "turbo"
    args = ["train-toy", "--size", "turbo", "--pairs", "4", "--out", str(out), "--threads", "1"]
    result = runner.invoke(app, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "serving.json").read_text())["default_steps"] == 2
    resumed = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == 8
    for config in out.rglob("config.json"):  # the teacher's folder is not written into the student
        assert "glide-base" not in config.read_text(), config


def test_eval_vae_judges_the_autoencoders_round_trips_per_level():
    result = runner.invoke(app, ["eval", "vae", "--model", "glide-base", "--per-level", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "glide-base autoencoder: 4 scenes per level" in result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:] if line.strip()}
    assert set(rows) == {"easy", "medium", "hard", "overall"}
    assert float(rows["easy"][-4]) >= 0.75  # the all-correct column of four round-tripped easy scenes
    bad = runner.invoke(app, ["eval", "vae", "--model", "no-such-model", "--per-level", "2"])
    assert bad.exit_code != 0 and "no-such-model" in bad.output
