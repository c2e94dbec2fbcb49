"""``glideserve serve`` fails early, with a message, on what the user can fix."""

from __future__ import annotations

from typer.testing import CliRunner

from glideserve.cli import app


def test_missing_model_is_reported_without_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "no-such-model"), "--port", "0"])
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output


def test_unknown_system_is_rejected():
    result = CliRunner().invoke(app, ["serve", "--system", "tgi"])
    assert result.exit_code == 2
    assert "glideserve" in result.output


def test_bad_public_url_is_reported_without_a_traceback():
    result = CliRunner().invoke(app, ["serve", "--public-url", "ftp://x", "--port", "0"])
    assert result.exit_code == 2
    assert "--public-url" in result.output and "Traceback" not in result.output


def test_limit_flags_reject_nonsense():
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout", "--write-timeout",
                 "--drain-timeout", "--max-connections"):
        result = CliRunner().invoke(app, ["serve", flag, "0", "--port", "0"])
        assert result.exit_code == 2, (flag, result.output)


def test_several_models_are_checked_before_anything_loads():
    runner = CliRunner()
    twice = runner.invoke(app, ["serve", "--model", "a=glide-tiny", "--model", "a=glide-small", "--port", "0"])
    assert twice.exit_code == 2 and "given twice" in twice.output and "Traceback" not in twice.output
    unnamed = runner.invoke(app, ["serve", "--model", "=glide-tiny", "--port", "0"])
    assert unnamed.exit_code == 2 and "NAME=PATH" in unnamed.output
    baseline = runner.invoke(app, ["serve", "--system", "request-batching", "--model", "glide-tiny",
                                   "--model", "glide-small", "--port", "0"])
    assert baseline.exit_code == 2 and "serves one model" in baseline.output


def test_execution_flags_reject_what_this_device_or_system_cannot_do():
    runner = CliRunner()
    graphs = runner.invoke(app, ["serve", "--model", "glide-tiny", "--compile", "--compile-mode", "reduce-overhead",
                                 "--port", "0"])
    assert graphs.exit_code == 2 and "needs a CUDA device" in graphs.output
    buckets = runner.invoke(app, ["serve", "--model", "glide-tiny", "--compile", "--compile-buckets", "1,x",
                                  "--port", "0"])
    assert buckets.exit_code == 2 and "--compile-buckets must be comma-separated" in buckets.output
    baseline = runner.invoke(app, ["serve", "--system", "request-batching", "--model", "glide-tiny", "--compile",
                                   "--port", "0"])
    assert baseline.exit_code == 2 and "apply to --system glideserve" in baseline.output
    memory = runner.invoke(app, ["serve", "--model", "glide-tiny", "--gpu-memory-fraction", "0.5", "--no-profile",
                                 "--port", "0"])
    assert memory.exit_code == 2 and "CUDA device's memory" in memory.output and "Traceback" not in memory.output
