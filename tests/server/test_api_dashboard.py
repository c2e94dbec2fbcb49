"""The live dashboard: its samples of the /metrics registry, its endpoints and key, --no-dashboard, and the
Grafana dashboard's queries against the metrics the server exports."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from glideserve.server import ServerConfig
from glideserve.server.dashboard import DashboardHistory, read_registry

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "glideserve.json"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_samples_turn_counters_into_rates_and_the_histogram_into_percentiles():
    registry, clock = CollectorRegistry(), Clock()
    requests = Counter("glideserve_requests", "", ["status"], registry=registry)
    Gauge("glideserve_queue_depth", "", registry=registry).set(3)
    latency = Histogram("glideserve_request_latency_seconds", "", buckets=(0.5, 1.0, 2.0), registry=registry)
    history = DashboardHistory(registry, slo_ms=lambda: 1500.0, clock=clock, history_s=5)
    history.sample()
    for _ in range(6):
        requests.labels(status="completed").inc()
    for _ in range(2):
        requests.labels(status="slo_unattainable").inc()
    requests.labels(status="deadline_exceeded").inc()
    for value in (0.2, 0.4, 0.8, 1.5):
        latency.observe(value)
    clock.t += 2.0
    point = history.sample()
    assert point["offered_per_s"] == pytest.approx(4.5) and point["refused_per_s"] == pytest.approx(1.0)
    assert point["admitted_per_s"] == pytest.approx(3.5) and point["dropped_per_s"] == pytest.approx(0.5)
    assert point["requests_total"]["completed"] == 6 and point["queue_depth"] == 3 and point["slo_ms"] == 1500
    assert point["latency_p50_s"] == pytest.approx(0.5) and 1.0 < point["latency_p99_s"] <= 2.0
    assert "cascade" not in point and "finetune" not in point  # panels only for features that are on
    for _ in range(10):
        clock.t += 1.0
        history.sample()
    assert len(history.samples) == 5  # a bounded ring: the last history_s seconds
    assert [s["t"] for s in history.since(clock.t - 2)] == [clock.t - 1, clock.t]


@pytest.fixture(scope="module")
def keyed_server(tiny_model):
    with LiveServer(tiny_model, ServerConfig(api_key="k3y", warmup=False)) as live:
        yield live


def test_the_page_is_offline_and_the_data_honours_the_api_key(keyed_server):
    page = httpx.get(f"{keyed_server.url}/dashboard")
    assert page.status_code == 200 and "glideserve dashboard" in page.text
    assert not re.search(r"(src|href)=\"https?://", page.text)  # every asset in the package
    assert httpx.get(f"{keyed_server.api}/dashboard").status_code == 401
    answer = httpx.get(f"{keyed_server.api}/dashboard", headers={"Authorization": "Bearer k3y"})
    assert answer.status_code == 200 and answer.json()["samples"]
    assert httpx.get(f"{keyed_server.api}/dashboard", params={"since": -1},
                     headers={"Authorization": "Bearer k3y"}).status_code == 400


def test_no_dashboard_turns_it_off(tiny_model):
    with LiveServer(tiny_model, ServerConfig(dashboard=False, warmup=False)) as live:
        assert httpx.get(f"{live.url}/dashboard").status_code == 404
        assert httpx.get(f"{live.api}/dashboard").status_code == 404
        assert live.state.dashboard is None


def _exported_names(server) -> set[str]:
    """Metric names the server renders: samples and declared families (a family without samples yet, such
    as LoRAs on a server that holds none, is still exported: Grafana shows it empty)."""
    text = httpx.get(f"{server.url}/metrics").text
    names = set(re.findall(r"^(glideserve_[a-z_]+)", text, re.M))
    names |= set(re.findall(r"^# TYPE (glideserve_[a-z_]+)", text, re.M))
    names |= {f"{n}_total" for n in re.findall(r"^# TYPE (glideserve_[a-z_]+) counter", text, re.M)}
    from glideserve.server.metrics import CascadeCollector

    describe = {"threshold": 0.5, "counts": {"light": 1, "heavy": 1, "escalated": 1, "heavy_refused": 0},
                "plan": {"light_capacity": 1.0, "heavy_capacity": 1.0, "demand": 1.0}, "light": "a", "heavy": "b"}
    registry = CollectorRegistry()
    registry.register(CascadeCollector(lambda: describe))
    names |= {name for name, _ in read_registry(registry)}
    pytest.importorskip("ray.serve")
    from glideserve.cluster.ingress import ClusterCollector

    backend = types.SimpleNamespace(names=["a"], replicas=lambda: [], counts={"retries": 0, "replica_failures": 0})
    registry = CollectorRegistry()
    registry.register(ClusterCollector(backend, types.SimpleNamespace(targets={"a": 1})))
    return names | {name for name, _ in read_registry(registry)}


def test_every_grafana_query_names_a_metric_the_server_exports(tmp_path, tiny_model):
    dashboard = json.loads(GRAFANA.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 10 and queries
    (tmp_path / "data").mkdir()
    (tmp_path / "loras").mkdir()
    with LiveServer("glide-tiny", ServerConfig(warmup=False), data_dir=tmp_path / "data",
                    lora_dir=str(tmp_path / "loras")) as live:
        httpx.post(f"{live.api}/images/generations", json={"prompt": "a red circle", "num_inference_steps": 2},
                   timeout=120).raise_for_status()
        exported = _exported_names(live)
    used = {name for query in queries for name in re.findall(r"glideserve_[a-z_]+", query)}
    missing = sorted(used - exported)
    assert not missing, f"Grafana queries name metrics the server does not export: {missing}"
