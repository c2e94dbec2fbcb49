"""``glideserve bench fullsize``: the published architecture sizes, and the whole command end to end at tiny scale."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from glideserve.bench.fullsize_models import count_parameters
from glideserve.bench.records import read_records_csv
from glideserve.cli import app


def test_full_scale_has_the_published_parameter_counts():
    sd3, sdxl = count_parameters("sd3"), count_parameters("sdxl")  # on the meta device: nothing is allocated
    # SD3-medium's MMDiT (2B), CLIP-L and bigG text towers, T5-XXL's encoder, the 16-channel VAE.
    assert round(sd3["transformer"] / 1e6) == 2028
    assert round(sd3["text_encoder"] / 1e6) == 124 and round(sd3["text_encoder_2"] / 1e6) == 695
    assert round(sd3["text_encoder_3"] / 1e6) == 4762
    assert round(sd3["vae"] / 1e6) == 84
    assert round(sdxl["unet"] / 1e6) == 2567  # SDXL base's UNet
    assert round(sdxl["text_encoder"] / 1e6) == 123 and round(sdxl["text_encoder_2"] / 1e6) == 695


def test_full_scale_without_cuda_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", "fullsize", "--family", "sdxl", "--out", str(out)])
    assert result.exit_code == 1
    assert "no CUDA device" in result.output and "--scale tiny" in result.output and "--device cpu" in result.output
    assert not out.exists()  # refused before anything was built or written
    result = CliRunner().invoke(app, ["bench", "fullsize", "--family", "sd3", "--cache", "deepcache:2",
                                      "--scale", "tiny", "--out", str(out)])
    assert result.exit_code == 1 and "the sd3 family implements" in result.output


def test_tiny_sd3_end_to_end(tmp_path):
    out, model_dir = tmp_path / "out", tmp_path / "model"
    result = CliRunner().invoke(app, [
        "bench", "fullsize", "--family", "sd3", "--scale", "tiny", "--device", "cpu", "--cache", "glideserve:2",
        "--steps", "4", "--rates", "2", "--duration", "2", "--isolated", "1", "--pipe-repeats", "1",
        "--slo-scale", "50", "--model-dir", str(model_dir), "--out", str(out), "--timeout-s", "120"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fullsize.json").read_text())
    assert (report["family"], report["scale"], report["device"], report["dtype"]) == ("sd3", "tiny", "cpu", "float32")

    # The model folder loads like any diffusers folder and carries the serving defaults.
    assert json.loads((model_dir / "serving.json").read_text()) == {
        "default_steps": 28, "default_guidance": 7.0, "default_size": 64, "max_sequence_length": 32}
    assert set(report["model"]["parameters"]) == {"transformer", "text_encoder", "text_encoder_2",
                                                  "text_encoder_3", "vae"}
    assert report["settings"]["steps"] == 4 and report["settings"]["size"] == "64x64"

    peak = report["peak"]["flops"]
    assert peak > 1e8 and report["flops_per_image"] > 0
    pipeline = {row["batch"]: row for row in report["diffusers_pipeline"]}
    assert set(pipeline) == {1, 4}
    for row in pipeline.values():
        assert row["latency_s"] > 0 and 0 < row["mfu"] < 1.5 and "peak_memory_gib" not in row  # CPU: no CUDA memory
    assert 3.0 < pipeline[4]["flops"] / pipeline[1]["flops"] < 4.5  # four images' work, one call's text encoding

    steps = {row["batch"]: row for row in report["denoiser_step"]}
    assert {b: row["rows"] for b, row in steps.items()} == {1: 2, 4: 8}  # classifier-free guidance: 2 rows per image
    assert steps[4]["flops"] == pytest.approx(4 * steps[1]["flops"], rel=0.01)
    for row in steps.values():
        assert row["bare_forward_s"] > 0 and 0 < row["bare_mfu"] < 1.5
        assert row["glideserve_step_s"] > 0 and len(row["glideserve_step_samples"]) == 3 * row["batch"]
        assert math.isfinite(row["overhead_pct"]) and row["overhead_pct"] > -100

    serving = report["serving"]
    assert serving["rates"] == [2.0] and serving["capacity_rps"] > 0
    assert list(serving["systems"]) == ["diffusers-sequential", "glideserve", "glideserve+glideserve:2"]
    for label, system in serving["systems"].items():
        assert "--device" in system["server_args"] and system["isolated_latency_s"] > 0
        (summary,) = system["runs"]
        assert summary["completed"] > 0 and summary["requests"] >= summary["completed"]
        assert summary["throughput_rps"] > 0 and summary["server_exit_code"] == 0
        assert summary["mfu"] is not None and summary["peak_flops"] == peak
    assert "--cache none" in " ".join(serving["systems"]["glideserve"]["server_args"])
    cached = read_records_csv(out / "glideserve_glideserve-2" / "rate-2" / "requests.csv")
    assert any(r.cached_steps for r in cached if r.completed)  # the policy really ran
    exact = read_records_csv(out / "glideserve" / "rate-2" / "requests.csv")
    assert not any(r.cached_steps for r in exact if r.completed)

    markdown = (out / "fullsize.md").read_text()
    for heading in ("## diffusers pipeline", "## Denoising step", "## Serving", "engine overhead", "SLO attainment"):
        assert heading in markdown
    assert "diffusers pipeline" in result.output  # the table is printed too
