"""The cascade commands end to end on small inputs: simulate, train-discriminator, and the benchmark's scoring."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from glideserve.bench.cascade_run import per_second, scene_prompts, score_policy
from glideserve.bench.records import DROPPED, LATE, ON_TIME, RequestRecord
from glideserve.cli import app
from glideserve.cli.cascade import _policy_timelines, cascade_report

runner = CliRunner()


def test_simulate_writes_results_and_a_plot(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(f"{i * 50},{i}" for i in range(400)) + "\n")  # 20 queries/s for 20 s
    result = runner.invoke(app, ["simulate", "--trace", str(trace), "--workers", "4", "--out", str(tmp_path / "sim"),
                                 "--policy", "milp", "--policy", "all-heavy"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "sim" / "results.json").read_text())
    by_policy = {r["policy"]: r for r in saved["results"]}
    assert by_policy["milp"]["queries"] == 400
    # Four A100s cannot serve 20 queries/s with SD1.5 alone; the cascade can.
    assert by_policy["milp"]["violation_ratio"] < by_policy["all-heavy"]["violation_ratio"]
    assert (tmp_path / "sim" / "simulation.png").stat().st_size > 0


def test_simulate_explains_a_missing_trace(tmp_path):
    result = runner.invoke(app, ["simulate", "--trace", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "not found" in result.output


def test_train_discriminator_on_a_handful_of_light_images(tmp_path):
    result = runner.invoke(app, ["cascade", "train-discriminator", "--light", "glide-tiny", "--out",
                                 str(tmp_path / "disc"), "--images", "10", "--steps", "3", "--light-steps", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "disc" / "discriminator.json").read_text())["report"]
    assert report["light_model"] == "glide-tiny" and report["held_out_images"] == 4
    assert 0.0 <= report["roc_auc"] <= 1.0 and report["escalated_fraction_at_threshold"]["1"] == 1.0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_benchmark_scoring_counts_only_on_time_correct_images_per_level():
    from glideserve.toy import scenes

    easy = "a red circle on a white background"
    right = _png(scenes.render_scene(scenes.draw_scene(scenes.parse_caption(easy), np.random.default_rng(0))))
    wrong = _png(np.full((64, 64, 3), 255, dtype=np.uint8))  # a blank white image: no circle
    records = [
        RequestRecord(0, 0, 0.2, ON_TIME, completed=True, prompt=easy, image=right, served_by="light", escalated=False),
        RequestRecord(1, 1, 0.7, ON_TIME, completed=True, prompt=easy, image=wrong, served_by="heavy", escalated=True),
        RequestRecord(2, 2, 1.1, LATE, completed=True, prompt=easy, image=right, served_by="heavy", escalated=True),
        RequestRecord(3, 3, 1.5, DROPPED, prompt=easy),
    ]
    levels = score_policy(records, duration_s=2.0, toy_clip=None)
    easy_row = levels["easy"]
    assert easy_row["requests"] == 4 and easy_row["served"] == 3
    assert easy_row["judge_all_correct"] == round(2 / 3, 4)
    assert easy_row["correct_on_time"] == 0.25 and easy_row["goodput_per_s"] == 0.5
    assert easy_row["violation_ratio"] == 0.5 and easy_row["escalated"] == round(2 / 3, 4)
    assert levels["overall"]["served_by"] == {"light": 1, "heavy": 2}
    timeline = per_second(records, 2)
    assert timeline == {"arrivals": [2, 2], "goodput": [1, 0], "late": [0, 1], "dropped": [0, 1]}


def test_benchmark_report_and_timelines_from_a_result():
    from glideserve.bench.cascade_run import CascadeBench, CascadeBenchResult

    bench = CascadeBench("light", "heavy", duration_s=2.0, static_threshold=0.4)
    result = CascadeBenchResult(bench, slo_s=5.0, isolated_s=1.0, capacity_per_s=1.0, offered_per_s=2.0, requests=4)
    row = {"requests": 4, "on_time": 1.0, "violation_ratio": 0.0, "served": 4, "judge_all_correct": 0.5,
           "correct_on_time": 0.5, "goodput_per_s": 1.0, "escalated": 0.25}
    timeline = {"arrivals": [2, 2, 0], "goodput": [1, 1, 0], "late": [0, 0, 0], "dropped": [0, 0, 0]}
    samples = [{"t": 0.5, "threshold": 0.3, "share:light": 0.25, "share:heavy": 0.75, "demand": 2.0}]
    for policy in ("all-light", "milp"):
        result.policies[policy] = {"levels": {"overall": {**row, "served_by": {"light": 4}}, "easy": row},
                                   "timeline": timeline, "samples": samples if policy == "milp" else []}
    timelines = _policy_timelines(result)
    assert timelines["milp"]["threshold"][:2] == [0.3, 0.3] and timelines["milp"]["light_workers"][0] == 0.25
    assert timelines["all-light"]["threshold"][0] == 0.0 and timelines["all-light"]["light_workers"][0] == 1.0
    report = cascade_report(result)
    assert "| milp | 0.000 | 0.500 | 0.500 | 1.000 |" in report and "| all-light | 0.50 / 0.50 / 0.25 | - | - |" in report


def test_scene_prompts_interleave_the_levels():
    from glideserve.toy import scenes

    prompts = scene_prompts(4, seed=0)
    levels = [scenes.parse_caption(p).difficulty for p in prompts]
    assert levels[:3] == ["easy", "medium", "hard"] and len(prompts) == 12
