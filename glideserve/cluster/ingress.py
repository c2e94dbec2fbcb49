"""The ingress deployment: the glideserve FastAPI app over a ClusterBackend of Ray Serve handles."""

from __future__ import annotations

import logging

import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve
from ray.exceptions import RayError, RayTaskError

from glideserve.cascade import allocator
from glideserve.cluster import registry
from glideserve.cluster.backend import ClusterBackend, ReplicaLostError, RetryPolicy
from glideserve.cluster.config import ClusterConfig
from glideserve.errors import GlideServeError
from glideserve.params import GenerationParams

log = logging.getLogger(__name__)


class RayCall:
    """One streaming handle call; Ray's failures become ReplicaLostError, refusals stay GlideServeErrors."""

    def __init__(self, response):
        self._response = response

    def cancel(self) -> None:
        self._response.cancel()

    async def __aiter__(self):
        try:
            async for item in self._response:
                yield item
        except GlideServeError:
            raise
        except RayTaskError as exc:  # raised in the replica: a refusal, or the replica's own failure
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GlideServeError):
                raise cause from None
            raise ReplicaLostError(f"the replica failed: {type(cause).__name__}: {cause}") from None
        except RayError as exc:  # the actor died, is unreachable, or the call was cancelled
            raise ReplicaLostError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from None


class RayReplicaPool:
    """The ClusterBackend's replicas: one Ray Serve handle per model and the app's registry."""

    def __init__(self, handles: dict, app_name: str):
        self.handles = handles
        self.registry = ray.get_actor(registry.registry_name(app_name), namespace=registry.NAMESPACE)
        self._cursor = 0

    def open(self, model: str, params: GenerationParams, request_id: str) -> RayCall:
        return RayCall(self.handles[model].options(stream=True).generate.remote(params, request_id))

    async def describe(self, model: str) -> dict:
        return await self.handles[model].describe.remote()

    async def snapshots(self):
        return await self.registry.snapshots.remote()

    async def steps(self):
        self._cursor, steps = await self.registry.steps_since.remote(self._cursor)
        return steps


class ServeScaler:
    """Sets a deployment's replica count through the Serve controller (the app runs with
    ``external_scaler_enabled``, the API Ray's own REST scaling endpoint uses)."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self.targets: dict[str, int] = {}

    def scale(self, deployment: str, replicas: int) -> None:
        if self.targets.get(deployment) == replicas:
            return
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        controller.update_deployment_replicas.remote(DeploymentID(name=deployment, app_name=self.app_name), replicas)
        self.targets[deployment] = replicas
        log.info("allocator: %s -> %d replica(s)", deployment, replicas)


class ReplicaPlacement:
    """Where a cascade plan lands on a cluster: whole replicas of each model, within their bounds, out of
    ``workers``; the models' profiles are the ones their replicas measured. ``scaler`` None: plans set
    only the threshold (replica counts are left to the configured policy)."""

    integral = True

    def __init__(self, backend: ClusterBackend, config: ClusterConfig, scaler: ServeScaler | None):
        self.backend = backend
        self.config = config
        self.scaler = scaler
        self.capacity = float(config.cascade_workers())

    def spec(self, name: str):
        return self.backend.spec_of(name)

    def profile(self, name: str):
        profile = (self.backend.description(name) or {}).get("profile")
        if profile is None:
            raise ValueError(f"model {name} has no measured latency profile (set engine.profile: true)")
        return profile

    def apply(self, plan: allocator.Allocation, light: str, heavy: str) -> None:
        if self.scaler is None:
            return
        counts = dict(zip((light, heavy), allocator.split_workers(int(self.capacity), plan)))
        for name, count in counts.items():
            bounds = self.config.model(name).replicas
            self.scaler.scale(name, max(bounds.min, min(bounds.max, count)))


class ClusterCollector:
    """Prometheus metrics only a cluster has: replicas per model (reporting, and the allocator's target when
    it sets them), retries, replica failures."""

    def __init__(self, backend: ClusterBackend, scaler: ServeScaler | None = None):
        self.backend = backend
        self.scaler = scaler

    def describe(self):
        return []

    def collect(self):
        replicas = GaugeMetricFamily("glideserve_cluster_replicas", "Replicas reporting, by model", labels=["model"])
        counts: dict[str, int] = {name: 0 for name in self.backend.names}
        for snapshot in self.backend.replicas():
            counts[snapshot.model] = counts.get(snapshot.model, 0) + 1
        for name, count in counts.items():
            replicas.add_metric([name], count)
        yield replicas
        if self.scaler is not None:
            targets = GaugeMetricFamily("glideserve_cluster_target_replicas", "Replicas the allocator set, by model",
                                        labels=["model"])
            for name, count in self.scaler.targets.items():
                targets.add_metric([name], count)
            yield targets
        for key, help_text in (("retries", "Requests re-sent to another replica after theirs died or hung"),
                               ("replica_failures", "Calls lost with their replica (died, hung or removed)")):
            family = CounterMetricFamily(f"glideserve_cluster_{key}", help_text)
            family.add_metric([], self.backend.counts[key])
            yield family


@serve.ingress()
class Ingress:
    """The HTTP front: ``create_app`` over a ClusterBackend (and a CascadeBackend with a cascade)."""

    def __init__(self, config: dict, handles: dict):
        from glideserve.server import ServerConfig, create_app
        from glideserve.server.limits import HttpLimits

        cfg = ClusterConfig.model_validate(config)
        names = [m.name for m in cfg.models]
        if cfg.cascade is not None:  # the heavy model is the default of requests that opt out of the cascade
            names.remove(cfg.cascade.heavy)
            names.insert(0, cfg.cascade.heavy)
        retry = RetryPolicy(cfg.faults.hang_timeout_s, {m.name: cfg.max_attempts(m) for m in cfg.models})
        cluster = ClusterBackend(RayReplicaPool(handles, cfg.app_name), names, retry)
        backend, scaler = cluster, None
        if cfg.cascade is not None:
            from glideserve.cascade.serving import CascadeConfig, build_cascade_backend, default_discriminator

            c = cfg.cascade
            cascade = CascadeConfig(c.light, c.heavy, c.discriminator or default_discriminator(c.light),
                                    None if c.threshold == "auto" else float(c.threshold), c.interval_s)
            scaler = ServeScaler(cfg.app_name) if cfg.allocation_policy == "milp" else None
            backend = build_cascade_backend(cluster, cascade, cfg.slo_ms, ReplicaPlacement(cluster, cfg, scaler))
        server = ServerConfig(model_id=names[0], api_key=cfg.api_key, max_queue=cfg.max_queue,
                              default_slo_ms=cfg.slo_ms, public_url=cfg.public_url,
                              limits=HttpLimits(drain_timeout_s=cfg.drain_timeout_s))
        self.fastapi_app = create_app(backend, server)
        self.fastapi_app.state.server.metrics.registry.register(ClusterCollector(cluster, scaler))
        self.backend = backend

    def __serve_build_asgi_app__(self):
        return self.fastapi_app
