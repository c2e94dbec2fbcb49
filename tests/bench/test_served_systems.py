"""``glideserve bench`` starting real ``glideserve serve`` processes for the engine and a baseline."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from glideserve.bench.records import read_records_csv
from glideserve.cli import app


def test_bench_load_starts_and_stops_servers(tiny_sd3_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "load", "--model", tiny_sd3_dir, "--system", "glideserve", "--system", "request-batching",
        "--arrival", "bursts", "--burst-size", "3", "--burst-interval", "1", "--num-bursts", "2", "--steps", "2",
        "--isolated", "1", "--slo-scale", "1000", "--timeout-s", "120", "--no-peak", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summaries = json.loads((out / "summary.json").read_text())
    for system in ("glideserve", "request-batching"):
        summary = summaries[system]
        assert summary["on_time"] == 6, summary
        assert summary["queue_s"] is not None  # the server's per-image timings came through
        assert summary["cpu_s_per_image"] > 0  # the benchmark owned the server process
        assert summary["flops_per_image"] > 0 and summary["achieved_flops"] > 0
        records = read_records_csv(out / system / "requests.csv")
        assert all(r.http_status == 200 for r in records)
        assert summary["server_exit_code"] == 0  # stopped with SIGTERM, drained and exited cleanly
        assert (out / f"server-{system}.log").is_file()


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "load", "--model", str(tmp_path / "no-such-model"), "--system", "diffusers-sequential",
        "--arrival", "constant", "--rate", "1", "--num-requests", "1", "--no-peak", "--no-count-flops",
        "--ready-timeout", "120", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "exited with code" in result.output and "no-such-model" in result.output
