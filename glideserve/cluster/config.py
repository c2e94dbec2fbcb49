"""cluster.yaml: what ``glideserve cluster up`` deploys, validated before anything starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glideserve.params import MAX_SLO_MS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_CONFIG_BYTES = 1 << 20


class ClusterConfigError(ValueError):
    """A cluster.yaml that cannot be deployed; the message names the field and what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaBounds(_Section):
    """How many replicas a model runs: between ``min`` and ``max``, starting at ``initial`` (default ``min``)."""

    min: int = Field(1, ge=1, le=1024)
    max: int = Field(1, ge=1, le=1024)
    initial: int | None = Field(None, ge=1, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicaBounds":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must be within min..max ({self.min}..{self.max})")
        return self

    @property
    def start(self) -> int:
        return self.initial if self.initial is not None else self.min


class ReplicaResources(_Section):
    """What one replica reserves from Ray: CPUs (also its torch threads), GPUs, memory."""

    num_cpus: float = Field(1.0, gt=0, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64)
    memory_gb: float | None = Field(None, gt=0, le=4096)


class EngineOptions(_Section):
    """The engine settings of each replica (the ``glideserve serve`` options of the same names)."""

    max_batch_rows: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1, le=100_000)
    policy: Literal["slack", "edf", "fcfs"] = "slack"
    cache: str = Field("auto", max_length=64)
    profile: bool = True
    device: str = Field("cpu", max_length=32)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = False
    compile_buckets: list[int] = Field(default_factory=list, max_length=16)
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    quantize: Literal["fp8"] | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)


class ModelDeployment(_Section):
    """One served model: a deployment whose replicas each run a glideserve engine for it.

    ``path`` is a bundled model name, a diffusers folder or a single-file checkpoint, as in
    ``glideserve serve --model`` (default: ``name``); on a multi-node cluster every node must
    be able to read it.
    """

    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = Field(None, min_length=1, max_length=4096)
    replicas: ReplicaBounds = ReplicaBounds()
    resources: ReplicaResources = ReplicaResources()
    engine: EngineOptions = EngineOptions()

    @property
    def source(self) -> str:
        return self.path if self.path is not None else self.name


class CascadeSection(_Section):
    """A DiffServe cascade: requests naming no model go to ``light``; the discriminator escalates the
    doubtful ones to ``heavy``. ``threshold`` is a number in [0, 1] or ``auto`` (planned by the
    allocator); ``workers`` is the replica budget the allocator splits between the two models
    (default: the sum of their ``max`` replicas)."""

    light: str = Field(pattern=NAME_PATTERN)
    heavy: str = Field(pattern=NAME_PATTERN)
    discriminator: str | None = Field(None, max_length=4096)
    threshold: float | Literal["auto"] = "auto"
    interval_s: float = Field(5.0, ge=0.1, le=3600)
    workers: int | None = Field(None, ge=2, le=4096)

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value):
        if value != "auto" and not 0.0 <= value <= 1.0:
            raise ValueError("must be 'auto' or a number in [0, 1]")
        return value

    @model_validator(mode="after")
    def _two_models(self) -> "CascadeSection":
        if self.light == self.heavy:
            raise ValueError("light and heavy must be two different models")
        return self


class AllocatorSection(_Section):
    """Who sets replica counts: ``milp`` (the cascade's allocator, from measured demand and the replicas'
    profiles; needs a cascade and ``slo_ms``), ``autoscale`` (Ray Serve's queue-length autoscaling within
    each model's bounds) or ``fixed`` (the initial counts). Default: ``milp`` with a cascade, else ``autoscale``."""

    policy: Literal["milp", "autoscale", "fixed"] | None = None
    target_ongoing_requests: float = Field(8.0, gt=0, le=10_000)


class FaultSection(_Section):
    """A replica that sends nothing for ``hang_timeout_s`` while holding a request counts as dead;
    a dead replica's requests are retried elsewhere, from the start with the same seed, at most
    ``max_attempts`` times in all (default: the model's ``max`` replicas + 1). Ray Serve restarts a
    replica whose health check (engine loop alive, stepping when it has work) fails."""

    hang_timeout_s: float = Field(60.0, ge=1, le=3600)
    max_attempts: int | None = Field(None, ge=1, le=64)
    health_check_period_s: float = Field(2.0, ge=0.5, le=600)
    health_check_timeout_s: float = Field(10.0, ge=1, le=600)


class RaySection(_Section):
    """Where to run: ``address`` of an existing cluster (default: start a local Ray instance, its files
    under ``run_dir`` or a temporary folder, ``num_cpus`` of this machine), and Ray's own dashboard."""

    address: str | None = Field(None, max_length=512)
    run_dir: str | None = Field(None, max_length=4096)
    num_cpus: int | None = Field(None, ge=1, le=100_000)
    dashboard: bool = False


class ClusterConfig(_Section):
    """The whole deployment: HTTP front (``host``, ``port``, ``api_key``, ``slo_ms`` of requests that name
    none, ``drain_timeout_s``), the models, an optional cascade, the allocator, faults and Ray."""

    app_name: str = Field("glideserve", pattern=NAME_PATTERN)
    host: str = Field("127.0.0.1", max_length=255)
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, min_length=1, max_length=512)
    public_url: str | None = Field(None, max_length=2048)
    slo_ms: float | None = Field(None, gt=0, le=MAX_SLO_MS)
    max_queue: int = Field(256, ge=1, le=100_000)
    drain_timeout_s: float = Field(30.0, gt=0, le=3600)
    models: list[ModelDeployment] = Field(min_length=1, max_length=64)
    cascade: CascadeSection | None = None
    allocator: AllocatorSection = AllocatorSection()
    faults: FaultSection = FaultSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: each name once; repeated: {', '.join(duplicates)}")
        if self.cascade is not None:
            for stage in ("light", "heavy"):
                if getattr(self.cascade, stage) not in names:
                    raise ValueError(f"cascade.{stage}: {getattr(self.cascade, stage)!r} is not one of the models "
                                     f"({', '.join(names)}); add it under models")
        policy = self.allocation_policy
        if policy == "milp" and self.cascade is None:
            raise ValueError("allocator.policy: milp sizes a cascade; add a cascade section or use autoscale")
        if policy == "milp" and self.slo_ms is None:
            raise ValueError("slo_ms: the milp allocator plans against an SLO; set slo_ms (milliseconds)")
        return self

    @property
    def allocation_policy(self) -> str:
        if self.allocator.policy is not None:
            return self.allocator.policy
        return "milp" if self.cascade is not None else "autoscale"

    def model(self, name: str) -> ModelDeployment:
        return next(m for m in self.models if m.name == name)

    def max_attempts(self, model: ModelDeployment) -> int:
        return self.faults.max_attempts if self.faults.max_attempts is not None else model.replicas.max + 1

    def cascade_workers(self) -> int:
        """The replica budget the allocator splits between the cascade's two models."""
        if self.cascade.workers is not None:
            return self.cascade.workers
        return self.model(self.cascade.light).replicas.max + self.model(self.cascade.heavy).replicas.max

    def with_api_key_from_env(self) -> "ClusterConfig":
        """``GLIDESERVE_API_KEY`` fills ``api_key`` when the file leaves it out (keep keys out of files)."""
        key = os.environ.get("GLIDESERVE_API_KEY")
        return self if self.api_key is not None or not key else self.model_copy(update={"api_key": key})


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster.yaml; ClusterConfigError names the first bad field."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ClusterConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClusterConfigError(f"{path}: no such file; write a cluster.yaml (see docs/cluster.md)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ClusterConfigError(f"{path}: not readable YAML: {exc}") from None
    return parse_config(data, str(path))


def parse_config(data: object, origin: str = "cluster.yaml") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{origin}: expected a mapping of settings at the top (models: ...), "
                                 f"got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data).with_api_key_from_env()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ClusterConfigError(f"{origin}: {where + ': ' if where else ''}{message}{more}") from None
