"""Starting and stopping a glideserve deployment on Ray Serve (``glideserve cluster up|down``)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import httpx

from glideserve.cluster.config import ClusterConfig, ModelDeployment

log = logging.getLogger(__name__)
STATE_FILE = "cluster.json"
READY_POLL_S = 0.5
# Ray puts Unix sockets under <temp dir>/session_<date>_<pid>/sockets/: their paths must stay under 108 bytes.
MAX_RAY_TEMP_DIR_CHARS = 40


def deployment_options(config: ClusterConfig, model: ModelDeployment) -> dict:
    """Ray Serve options of one model's deployment: resources, replica count or autoscaling bounds, health
    checks, the drain on shutdown, and the deadline-aware router."""
    from ray.serve.config import RequestRouterConfig

    from glideserve.cluster.router import DeadlineAwareRouter

    resources = model.resources
    actor = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_gb is not None:
        actor["memory"] = int(resources.memory_gb * 2**30)
    options = dict(name=model.name, ray_actor_options=actor,
                   # the engine bounds its queue and refuses by itself; Ray must not refuse before it does
                   max_ongoing_requests=model.engine.max_queue + model.engine.max_batch_rows,
                   health_check_period_s=config.faults.health_check_period_s,
                   health_check_timeout_s=config.faults.health_check_timeout_s,
                   graceful_shutdown_timeout_s=config.drain_timeout_s, graceful_shutdown_wait_loop_s=0.5,
                   request_router_config=RequestRouterConfig(request_router_class=DeadlineAwareRouter,
                                                             request_routing_stats_period_s=1.0))
    bounds = model.replicas
    if config.allocation_policy == "autoscale" and bounds.max > bounds.min:
        options["autoscaling_config"] = {"min_replicas": bounds.min, "max_replicas": bounds.max,
                                         "initial_replicas": bounds.start,
                                         "target_ongoing_requests": config.allocator.target_ongoing_requests}
    else:  # fixed, or set live by the cascade's allocator (milp)
        options["num_replicas"] = bounds.start
    return options


def build_application(config: ClusterConfig):
    """The Ray Serve application: one deployment per model and the ingress bound to their handles."""
    from ray import serve

    from glideserve.cluster.deployments import ModelReplica
    from glideserve.cluster.ingress import Ingress

    handles = {}
    for model in config.models:
        deployment = serve.deployment(ModelReplica).options(**deployment_options(config, model))
        handles[model.name] = deployment.bind(model.model_dump(), config.app_name, config.faults.hang_timeout_s)
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * config.max_queue),
        graceful_shutdown_timeout_s=config.drain_timeout_s + 5, graceful_shutdown_wait_loop_s=0.5)
    return ingress.bind(config.model_dump(), handles)


class ClusterRuntime:
    """One deployment of a ClusterConfig: ``up`` connects to (or starts) Ray, deploys and waits until the
    API answers ready; ``down`` drains (admitted requests finish) and stops what ``up`` started.

    Without ``ray.address`` a local Ray instance is started with its files under ``run_dir`` (default:
    a new temporary folder) and no dashboard unless asked. ``run_dir/cluster.json`` records the process,
    the URL and the app, for ``glideserve cluster down``.
    """

    def __init__(self, config: ClusterConfig, run_dir: str | Path | None = None):
        self.config = config
        given = run_dir or config.ray.run_dir
        self.run_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="glideserve-cluster-"))
        self.started_ray = False

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://[{host}]:{self.config.port}" if ":" in host else f"http://{host}:{self.config.port}"

    def up(self, ready_timeout_s: float = 600.0) -> str:
        import ray
        from ray import serve

        from glideserve.cluster import registry

        self.run_dir.mkdir(parents=True, exist_ok=True)
        ray_config = self.config.ray
        if ray_config.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance writes no token into $HOME
            ray.init(num_cpus=ray_config.num_cpus, include_dashboard=ray_config.dashboard,
                     _temp_dir=str(self._ray_temp_dir()), namespace=registry.NAMESPACE,
                     logging_level=logging.WARNING)
            self.started_ray = True
        else:
            ray.init(address=ray_config.address, namespace=registry.NAMESPACE, logging_level=logging.WARNING)
        try:
            serve.start(http_options={"host": self.config.host, "port": self.config.port})
            registry.get_or_create(self.config.app_name)
            serve.run(build_application(self.config), name=self.config.app_name, route_prefix="/",
                      external_scaler_enabled=self.config.allocation_policy == "milp")
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.down()
            raise
        self._write_state()
        return self.url

    def _ray_temp_dir(self) -> Path:
        """``run_dir/ray``, or, when that path is too long for Ray's sockets, a short temporary folder that
        ``run_dir/ray`` links to."""
        wanted = (self.run_dir / "ray").resolve()
        if len(str(wanted)) <= MAX_RAY_TEMP_DIR_CHARS:
            return wanted
        short = Path(tempfile.mkdtemp(prefix="glideserve-ray-"))
        if not wanted.exists():
            wanted.symlink_to(short, target_is_directory=True)
        return short

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(self.url + "/ready", timeout=5.0)
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(READY_POLL_S)
        raise TimeoutError(f"the deployment did not answer ready within {timeout_s:.0f} s (last: {last}); "
                           f"see the replica logs under {self.run_dir / 'ray'}")

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "url": self.url, "app": self.config.app_name,
                 "address": self.config.ray.address, "started_ray": self.started_ray}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    def down(self) -> None:
        """Delete the app (Serve drains each replica's ongoing requests first), then stop local Ray."""
        import ray
        from ray import serve

        from glideserve.cluster import registry

        if not ray.is_initialized():
            return
        try:
            serve.delete(self.config.app_name, _blocking=True)
            registry.kill(self.config.app_name)
        finally:  # a local instance goes with its Serve controller and proxy; a joined cluster keeps its Serve

            ray.shutdown()
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)
