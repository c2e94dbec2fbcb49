"""Reports, plots and the ``glideserve bench`` commands end to end against a local server."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from glideserve.bench import plots
from glideserve.bench.arrivals import make_schedule
from glideserve.bench.metrics import summarize
from glideserve.bench.records import RequestRecord, read_records_csv
from glideserve.bench.report import latency_markdown, load_markdown, sweep_markdown
from glideserve.cli import app


def _record(i, latency, status="on_time", completed=True):
    return RequestRecord(index=i, prompt_id=i, scheduled_s=float(i), status=status, sent_s=float(i),
                         finished_s=i + latency, completed=completed, http_status=200 if completed else 429,
                         slo_s=1.5)


def _summaries():
    fast = [_record(i, 0.5) for i in range(4)]
    slow = [_record(0, 1.0), _record(1, 2.0, "late"), _record(2, 0.0, "dropped", completed=False)]
    return {"glideserve": (fast, summarize(fast, offered_rate=1.0)),
            "diffusers-sequential": (slow, summarize(slow, offered_rate=1.0))}


def test_load_markdown_has_a_row_per_system_with_its_figures():
    text = load_markdown({name: s for name, (_, s) in _summaries().items()}, title="poisson")
    lines = text.splitlines()
    assert lines[0] == "## poisson"
    row = next(line for line in lines if line.startswith("| diffusers-sequential"))
    assert "| 3 | 1 / 1 / 0 / 1 | 33.3% |" in row
    assert "- diffusers-sequential: CPU seconds per image omitted" in text


def test_sweep_and_latency_markdown():
    summaries = {name: s for name, (_, s) in _summaries().items()}
    sweep = sweep_markdown({name: [s] for name, s in summaries.items()})
    assert sweep.count("| 1.00 |") == 2
    summaries["glideserve"]["inference_s"] = None
    table = latency_markdown({"glideserve": {"single": summaries["glideserve"]}})
    assert "| glideserve | single | 4 | 0.50 |" in table and "n/a" in table


def test_plots_write_png_files(tmp_path):
    data = _summaries()
    plots.plot_latency_cdf({n: records for n, (records, _) in data.items()}, tmp_path / "cdf.png")
    plots.plot_outcomes_over_time({n: s["per_second"] for n, (_, s) in data.items()}, tmp_path / "out.png")
    plots.plot_sweep({n: [s, dict(s, offered_rate=2.0)] for n, (_, s) in data.items()}, tmp_path / "sweep.png")
    for name in ("cdf.png", "out.png", "sweep.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_bench_load_against_a_running_server(image_server, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "load", "--url", image_server.url, "--system", "fake", "--arrival", "constant", "--rate", "20",
        "--num-requests", "8", "--slo-scale", "10", "--isolated", "2", "--no-peak", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())["fake"]
    assert summary["requests"] == 8 and summary["completed"] == 8
    assert summary["isolated_latency_s"] > 0 and summary["slo_s"]["max"] > 0
    assert summary["queue_s"] is not None  # read from the server's timing block
    assert len(read_records_csv(out / "fake" / "requests.csv")) == 8
    assert (out / "report.md").read_text().count("| fake |") == 1
    assert (out / "latency_cdf.png").stat().st_size > 0 and (out / "outcomes.png").stat().st_size > 0
    # 1 warm-up + 2 isolated + 8 load requests reached the server
    assert len(image_server.received) == 11


def test_systems_compared_side_by_side_share_the_first_systems_slo(start_image_server, tmp_path):
    out = tmp_path / "out"
    fast_server, slow_server = start_image_server(0.1), start_image_server(0.5)
    result = CliRunner().invoke(app, [
        "bench", "load", "--url", fast_server.url, "--system", "fast", "--url", slow_server.url,
        "--system", "slow", "--arrival", "constant", "--rate", "10", "--num-requests", "4", "--slo-scale", "2",
        "--isolated", "1", "--no-peak", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summaries = json.loads((out / "summary.json").read_text())
    fast, slow = summaries["fast"], summaries["slow"]
    assert slow["isolated_latency_s"] > fast["isolated_latency_s"]
    assert fast["slo_s"]["max"] == slow["slo_s"]["max"] == 2 * fast["isolated_latency_s"]
    assert slow["late"] == 4  # 0.5 s answers miss an SLO of twice the fast server's ~0.1 s


def test_bench_sweep_and_latency_against_a_running_server(image_server, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, [
        "bench", "sweep", "--url", image_server.url, "--rates", "5,10", "--duration", "0.6", "--slo-ms", "1000",
        "--no-peak", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["server"]
    assert [s["offered_rate"] for s in sweep] == [5.0, 10.0]
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    result = runner.invoke(app, [
        "bench", "latency", "--url", image_server.url, "--single-count", "3", "--interval", "0.1",
        "--batch-count", "4", "--out", str(tmp_path / "lat")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "lat" / "latency.json").read_text())["server"]
    assert table["single"]["requests"] == 3 and table["batched"]["requests"] == 4
    assert table["batched"]["inference_s"] is not None


def test_bench_load_replays_a_trace_with_its_prompt_ids(image_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("".join(f"{i * 1000},{pid}\n" for i, pid in enumerate([4, 0, 2, 1, 3, 5])))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zero\none\ntwo\n\n")
    result = CliRunner().invoke(app, [
        "bench", "load", "--url", image_server.url, "--arrival", "trace", "--trace", str(trace), "--rate", "20",
        "--duration", "0.2", "--prompts", str(prompts), "--slo-ms", "5000", "--isolated", "0", "--no-peak",
        "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # The whole trace is fitted into 0.2 s and thinned (seeded) to 20 req/s x 0.2 s = 4 arrivals.
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["server"]
    assert summary["requests"] == 4 and summary["offered_rate"] == 4 / 0.2
    kept = make_schedule("trace", trace=trace, rate=20, duration_s=0.2, seed=0).prompt_ids
    trace_ids = [4, 0, 2, 1, 3, 5]
    assert [trace_ids.index(pid) for pid in kept] == sorted(trace_ids.index(pid) for pid in kept)  # trace order
    bodies = sorted((body for _, body in image_server.received), key=lambda b: b["seed"])
    assert [b["prompt"] for b in bodies] == [["zero", "one", "two"][pid % 3] for pid in kept]
    assert summary["isolated_latency_s"] is None


def test_bench_load_explains_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["bench", "load", "--rate", "1", "--num-requests", "2", "--no-peak",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "give --url of a running server, or --model" in result.output
    result = CliRunner().invoke(app, ["bench", "load", "--url", "http://127.0.0.1:9", "--arrival", "trace",
                                      "--trace", str(tmp_path / "none.csv"), "--no-peak", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not found" in result.output


def test_bench_load_mixed_workload_has_a_slo_and_a_row_per_class(image_server, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "load", "--url", image_server.url, "--arrival", "constant", "--rate", "40", "--num-requests", "24",
        "--steps-mix", "2,4", "--size-mix", "64x64,32x32", "--isolated", "1", "--slo-scale", "3", "--no-peak",
        "--out", str(tmp_path / "mix")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "mix" / "summary.json").read_text())["server"]
    classes = {"2 steps 64x64", "2 steps 32x32", "4 steps 64x64", "4 steps 32x32"}
    assert set(summary["isolated_latency_by_class"]) == classes
    assert sum(c["requests"] for c in summary["by_class"].values()) == 24
    records = read_records_csv(tmp_path / "mix" / "server" / "requests.csv")
    for record in records:
        isolated = summary["isolated_latency_by_class"][record.workload_class]
        assert record.slo_s == pytest.approx(3 * isolated)
    bodies = {b["seed"]: b for _, b in image_server.received if "slo_ms" in b}  # not the isolated ones
    for record in records:  # the body sent matches the class recorded, drawn per index
        body = bodies[record.index]
        assert record.workload_class == f"{body['num_inference_steps']} steps {body['size']}"
    assert "By request class" in (tmp_path / "mix" / "report.md").read_text()


def test_system_labels_carry_extra_serve_arguments():
    from glideserve.cli.bench import parse_system

    assert parse_system("glideserve") == ("glideserve", "glideserve", ())
    assert parse_system("fcfs=glideserve --policy fcfs") == ("fcfs", "glideserve", ("--policy", "fcfs"))
    assert parse_system("q=glideserve --server-arg 'a b'") == ("q", "glideserve", ("--server-arg", "a b"))
    with pytest.raises(ValueError, match="LABEL=SYSTEM"):
        parse_system("=glideserve")
