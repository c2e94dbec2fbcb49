"""cluster.yaml validation, the CLI's refusal of a bad one before anything starts, the router's ranking,
and the single-machine path staying free of Ray."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from glideserve.cluster.config import ClusterConfigError, load_config, parse_config

GOOD = {"models": [{"name": "glide-turbo", "replicas": {"min": 1, "max": 4}},
                   {"name": "glide-base", "replicas": {"min": 1, "max": 4}, "resources": {"num_cpus": 2}}],
        "cascade": {"light": "glide-turbo", "heavy": "glide-base"}, "slo_ms": 2000}


def test_a_good_config_resolves_its_defaults():
    config = parse_config(GOOD)
    assert config.host == "127.0.0.1" and config.allocation_policy == "milp"
    assert config.cascade_workers() == 8 and config.max_attempts(config.model("glide-base")) == 5
    assert parse_config({"models": [{"name": "glide-tiny"}]}).allocation_policy == "autoscale"


@pytest.mark.parametrize("change, field", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "replicas": {"min": 3, "max": 2}}]}, "models.0.replicas"),
    ({"models": [{"name": "a", "replicas": {"min": 1, "max": 2, "initial": 5}}]}, "models.0.replicas"),
    ({"models": [{"name": "../etc"}]}, "models.0.name"),
    ({"models": [{"name": "a", "engine": {"dtype": "int4"}}]}, "models.0.engine.dtype"),
    ({"models": [{"name": "a", "gpus": 1}]}, "models.0.gpus"),
    ({"port": 70000}, "port"),
    ({"cascade": {"light": "glide-turbo", "heavy": "nope"}}, "cascade.heavy"),
    ({"cascade": {"light": "glide-turbo", "heavy": "glide-turbo"}}, "cascade"),
    ({"cascade": {"light": "glide-turbo", "heavy": "glide-base", "threshold": 2}}, "cascade.threshold"),
    ({"slo_ms": None}, "slo_ms"),
    ({"cascade": None, "allocator": {"policy": "milp"}}, "allocator.policy"),
    ({"faults": {"hang_timeout_s": 0}}, "faults.hang_timeout_s"),
])
def test_a_bad_config_names_the_field(change, field):
    with pytest.raises(ClusterConfigError, match=field.replace(".", r"\.")):
        parse_config({**GOOD, **change})


def test_files_that_are_not_configs(tmp_path):
    with pytest.raises(ClusterConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ClusterConfigError, match="not readable YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ClusterConfigError, match="expected a mapping"):
        load_config(bad)


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GLIDESERVE_API_KEY", "secret")
    assert parse_config(GOOD).api_key == "secret"
    assert parse_config({**GOOD, "api_key": "file-key"}).api_key == "file-key"


def test_cluster_up_refuses_a_bad_config_before_starting_anything(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("models:\n  - name: glide-tiny\n    replicas: {min: 2, max: 1}\n")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "glideserve", "cluster", "up", "--config", str(config),
                             "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "models.0.replicas" in result.stderr and "max (1) must be >= min (2)" in result.stderr
    assert not run_dir.exists()  # no Ray instance, no files


def test_the_single_machine_path_does_not_import_ray():
    code = ("import sys, glideserve.cli, glideserve.server, glideserve.cascade.serving, glideserve.cluster.config\n"
            "from glideserve.cluster import backend\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_router_sends_a_request_to_the_replica_predicted_to_start_it_first():
    pytest.importorskip("ray.serve")
    from glideserve.cluster.router import predicted_wait_s, rank

    def replica(name, **stats):
        return types.SimpleNamespace(replica_id=name, routing_stats=stats)

    busy = replica("busy", waiting=6, running=2, step_s=0.05, accepting=True)
    slow = replica("slow", waiting=1, running=1, step_s=0.5, accepting=True)
    idle = replica("idle", waiting=0, running=0, step_s=0.05, accepting=True)
    draining = replica("draining", waiting=0, running=0, accepting=False)
    ranks = rank([busy, slow, idle, draining], ongoing={})
    assert ranks[0] == [idle] and ranks[1][-1] is draining
    assert [r.replica_id for r in ranks[1][:2]] == ["busy", "slow"]  # 8 x 0.05 s < 2 x 0.5 s
    # The router's own live count of calls it sent beats a replica's report, which lags.
    assert rank([busy, idle], ongoing={"idle": 20})[0] == [busy]
    assert predicted_wait_s({}, None) == 0.0


def test_deployment_options_follow_the_allocator_policy():
    pytest.importorskip("ray.serve")
    from glideserve.cluster.runtime import deployment_options

    autoscaled = parse_config({"models": [{"name": "a", "replicas": {"min": 1, "max": 4, "initial": 2},
                                           "resources": {"num_cpus": 2, "num_gpus": 1, "memory_gb": 8}}]})
    options = deployment_options(autoscaled, autoscaled.models[0])
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 8.0}
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, "memory": 8 * 2**30}
    assert options["max_ongoing_requests"] == 256 + 16  # the engine, not Ray, bounds the queue
    assert options["graceful_shutdown_timeout_s"] == autoscaled.drain_timeout_s
    # Under the cascade's allocator (milp) Ray's autoscaler stays off: the plan sets the counts.
    milp = parse_config(GOOD)
    assert deployment_options(milp, milp.models[0])["num_replicas"] == 1
    assert "autoscaling_config" not in deployment_options(milp, milp.models[0])


def test_cluster_check_resolves_local_model_paths(tmp_path):
    from typer.testing import CliRunner

    from glideserve.cli import app

    config = tmp_path / "cluster.yaml"
    config.write_text(f"models:\n  - name: glide-tiny\n  - name: mine\n    path: {tmp_path / 'missing'}\n")
    result = CliRunner().invoke(app, ["cluster", "check", "--config", str(config)])
    assert result.exit_code == 2 and "models.1.path" in result.output and "not found" in result.output
    config.write_text("models:\n  - name: glide-tiny\n")
    result = CliRunner().invoke(app, ["cluster", "check", "--config", str(config)])
    assert result.exit_code == 0 and "glide-tiny x1..1; allocator autoscale" in result.output
