"""``glideserve serve``: the OpenAI-compatible HTTP API and playground around a backend."""

from __future__ import annotations

import dataclasses
import enum
import logging
from pathlib import Path
from typing import List, Optional

import typer

from glideserve.cli.errors import fail
from glideserve.cli.execution import (AttentionOpt, CompileBucketsOpt, CompileModeOpt, CompileOpt, MemoryFractionOpt,
                                     QuantizeOpt, WarmSizeOpt, execution_options)
from glideserve.errors import GlideServeError
from glideserve.models import DEFAULT_MODEL

BASELINES_MODULE = "glideserve.bench.baselines"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class System(str, enum.Enum):
    """Which system serves the requests: this engine, or a baseline for comparison."""

    glideserve = "glideserve"
    diffusers_sequential = "diffusers-sequential"
    request_batching = "request-batching"


class Policy(str, enum.Enum):
    """glideserve's scheduling policies (see glideserve.scheduler.policy)."""

    slack = "slack"
    edf = "edf"
    fcfs = "fcfs"


class LogLevel(str, enum.Enum):
    """Log levels shared by uvicorn and the logging module."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def make_backend(system: System, model: str | list[str], max_loaded_models: int | None = None,
                 weights_memory_gb: float | None = None, offload_memory_gb: float | None = None, **config):
    """Load ``model`` (or several ``[NAME=]PATH`` models, the first the default) into the backend of
    ``system`` (a GlideServeError explains any failure)."""
    sources = model_sources(system, [model] if isinstance(model, str) else model, max_loaded_models,
                            weights_memory_gb, offload_memory_gb)
    if system is System.glideserve:
        from glideserve import AsyncEngine

        return AsyncEngine.from_models(sources, max_loaded_models=max_loaded_models,
                                       weights_memory_gb=weights_memory_gb, offload_memory_gb=offload_memory_gb,
                                       **config)
    model = sources[0].path
    try:
        from glideserve.bench import baselines
    except ModuleNotFoundError as exc:
        if exc.name != BASELINES_MODULE:
            raise
        raise GlideServeError(
            f"--system {system.value} needs the module {BASELINES_MODULE}, which this installation lacks; "
            "use --system glideserve or install a glideserve build that includes the baselines") from None
    return baselines.make_backend(system.value, model, **config)


def model_sources(system: System, models: list[str], max_loaded_models: int | None = None,
                  weights_memory_gb: float | None = None, offload_memory_gb: float | None = None) -> list:
    """The ModelSources of ``[NAME=]PATH`` models, checked against what ``system`` can serve (no loading)."""
    from glideserve.engine.model_set import ModelSet, ModelSource

    sources = [ModelSource.parse(m) for m in models]
    if system is System.glideserve:
        ModelSet(sources, max_loaded_models)  # names given twice, a wrong model count
    elif len(sources) > 1 or max_loaded_models is not None or weights_memory_gb is not None \
            or offload_memory_gb is not None:
        raise GlideServeError(f"--system {system.value} serves one model; serve several with --system glideserve")
    return sources


def check_before_listening(system: System, models: list[str], options: dict, **model_options) -> None:
    """What can be checked without loading (settings, model names and paths) fails before the server listens."""
    import torch

    from glideserve.models.loading import resolve_model_path

    for source in model_sources(system, models, **model_options):
        resolve_model_path(source.path)
    if system is System.glideserve:
        from glideserve.config import EngineConfig
        from glideserve.engine.memory_plan import device_memory_for

        config = EngineConfig.from_kwargs(**options)
        if config.gpu_memory_fraction is not None:
            device_memory_for(torch.device(config.device))  # planning needs a CUDA device


def parse_drop_late_after(text: str) -> float | None:
    """``never`` or a non-negative number (a multiple of the request's SLO)."""
    if text.strip().lower() == "never":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 100:
        raise ValueError(f"--drop-late-after must be a number in 0..100 or 'never', got {text!r}")
    return value


def model_id_for(model: str) -> str:
    """The name clients pass as ``model``: ``NAME`` of ``NAME=PATH``, a bundled name as is, a folder by its name."""
    from glideserve.engine.model_set import ModelSource

    return ModelSource.parse(model).name


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``serve`` to the app."""

    @app.command("serve")
    def serve(
        model: List[str] = typer.Option([DEFAULT_MODEL], help="[NAME=]MODEL: a bundled model name, diffusers "
                                        "folder or checkpoint, served as NAME (default: the bundled or folder "
                                        "name). Repeat to serve several; the first is the default."),
        max_loaded_models: Optional[int] = typer.Option(None, min=1, help="Models whose weights stay resident "
                                                        "at once; the least recently used idle one is unloaded "
                                                        "and loads again on its next request (default: all)."),
        weights_memory_gb: Optional[float] = typer.Option(None, min=0.001, help="Budget of resident model "
                                                          "weights in GiB, enforced like --max-loaded-models."),
        offload_memory_gb: Optional[float] = typer.Option(None, min=0.001, help="Keep models unloaded by "
                                                          "--max-loaded-models / --weights-memory-gb in this much "
                                                          "host memory (GiB) and copy them back when requested, "
                                                          "instead of loading them from disk again (for GPUs)."),
        host: str = typer.Option("127.0.0.1", help="Interface to bind; use 0.0.0.0 to accept remote clients."),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0 picks a free one)."),
        api_key: Optional[str] = typer.Option(None, envvar="GLIDESERVE_API_KEY", show_envvar=True,
                                              help="Require 'Authorization: Bearer KEY' on /v1 routes."),
        public_url: Optional[str] = typer.Option(
            None, help="Base of the image URLs handed out, e.g. https://images.example.com (default: relative "
                       "URLs; the client's Host header is never used)."),
        docs: bool = typer.Option(False, help="Serve /docs and /redoc (their pages load scripts from a public CDN)."),
        dashboard: bool = typer.Option(True, help="Serve the live dashboard at /dashboard (its data at "
                                                  "GET /v1/dashboard, which honours --api-key)."),
        drain_timeout: float = typer.Option(30.0, min=0.001, help="Seconds SIGTERM waits for admitted requests; "
                                                                  "the rest then fail with 503 drain_timeout."),
        header_timeout: float = typer.Option(10.0, min=0.001, help="Seconds a client has to send request "
                                                                   "headers (then 408)."),
        body_timeout: float = typer.Option(30.0, min=0.001, help="Seconds a client has to send the request "
                                                                 "body after its headers (then 408)."),
        keep_alive_timeout: float = typer.Option(5.0, min=0.001, help="Seconds an idle keep-alive connection "
                                                                      "stays open."),
        write_timeout: float = typer.Option(60.0, min=0.001, help="Seconds a client may read none of an answer "
                                                                  "before it is disconnected."),
        max_connections: int = typer.Option(512, min=1, help="Open connections; beyond it: 503 "
                                                             "too_many_connections."),
        max_queue: int = typer.Option(256, min=1, help="Images that may wait for a slot; beyond it: 429."),
        max_batch_rows: int = typer.Option(16, min=1, help="Model rows per denoising step (CFG takes two)."),
        system: System = typer.Option(System.glideserve, help="Serving system behind the API."),
        device: str = typer.Option("cpu", help="Torch device, e.g. cpu or cuda."),
        dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
        warmup: bool = typer.Option(True, help="Run one 1-step generation before reporting ready."),
        policy: Policy = typer.Option(Policy.slack, help="glideserve's step scheduling: slack (least slack first), "
                                                         "edf (earliest deadline first) or fcfs (arrival order, "
                                                         "deadline-blind)."),
        default_slo_ms: Optional[float] = typer.Option(None, min=1, help="SLO of requests without slo_ms "
                                                                         "(default: none, best effort)."),
        drop_late_after: str = typer.Option(
            "0", help="Drop an admitted request (503 deadline_exceeded) once it is predicted to finish later "
                      "than its deadline by this many times its SLO (0: as soon as it is predicted late); "
                      "'never' keeps every admitted request."),
        admission_margin: float = typer.Option(0.15, min=0, max=0.9, help="Fraction of each SLO kept in reserve "
                                               "for prediction error when admitting."),
        max_paused: int = typer.Option(4, min=0, help="Requests that may be paused by preemption at once "
                                                      "(0: no preemption)."),
        profile: bool = typer.Option(True, help="Measure the latency profile at start-up (or load it from the "
                                                "cache); --no-profile starts from online estimates."),
        profile_cache: Optional[Path] = typer.Option(None, help="JSON file of measured latency profiles "
                                                                "(default: the user's cache directory)."),
        cache: str = typer.Option("auto", help="Step-caching policy of requests that name none: auto (the "
                                               "model family's default: adaptive for SD3 models, none for "
                                               "UNets), none (exact), adaptive, glideserve:N, fora:N, "
                                               "taylorseer:N, teacache:T, fbcache:T or deepcache:N (a "
                                               "request's `cache` field overrides it)."),
        full_slots: Optional[int] = typer.Option(None, min=1, help="Progressive batching: caching requests that "
                                                 "take a full step per step (default: no limit)."),
        cache_memory_mb: float = typer.Option(1024.0, min=0, help="Memory budget of the per-request feature "
                                              "caches; a request that does not fit takes full steps."),
        min_full_fraction: float = typer.Option(0.33, min=0.05, max=1.0, help="Quality floor of the adaptive "
                                                "policy: at least this share of a request's steps run every "
                                                "block (0.33: at most 2 cached steps in a row)."),
        latent_aware: bool = typer.Option(False, help="Latent-aware denoising for requests that do not say "
                                                      "(SD3 models)."),
        lora_dir: Optional[Path] = typer.Option(None, help="Folder of LoRA adapters (.safetensors) requests may "
                                                           "name in `lora`; nothing outside it is read."),
        lora_memory_mb: float = typer.Option(512.0, min=0.001, help="Budget of resident LoRA adapters' weights "
                                             "per model; the least recently used are evicted (and read again "
                                             "when named)."),
        lora_uploads: bool = typer.Option(False, help="Allow PUT/DELETE /v1/loras/NAME to add and remove "
                                                      "adapters in --lora-dir (use with --api-key)."),
        max_lora_upload_mb: float = typer.Option(64.0, min=0.001, max=4096, help="Largest adapter file an "
                                                 "upload may send."),
        cascade: Optional[str] = typer.Option(
            None, help="light=MODEL,heavy=MODEL[,discriminator=PATH][,threshold=T|auto][,interval=S]: requests "
                       "naming no model (or 'cascade') are answered by the light model when the discriminator's "
                       "confidence is at least the threshold, else by the heavy one. auto (the default) re-plans "
                       "the threshold and both models' step-time shares every S seconds (default 5) from "
                       "demand with the allocation MILP (needs --default-slo-ms). Both models are served "
                       "(no --model needed); the discriminator defaults to the bundled one of the light model."),
        data_dir: Optional[Path] = typer.Option(None, help="Folder of fine-tuning datasets (one folder of image + "
                                                "caption pairs each): turns on /v1/fine_tuning/jobs and "
                                                "POST /v1/files; the adapters go to --lora-dir."),
        compile: CompileOpt = False,
        compile_mode: CompileModeOpt = "default",
        compile_buckets: CompileBucketsOpt = None,
        attention: AttentionOpt = "auto",
        quantize: QuantizeOpt = None,
        gpu_memory_fraction: MemoryFractionOpt = None,
        warm_size: WarmSizeOpt = None,
        log_level: LogLevel = typer.Option(LogLevel.info, help="uvicorn and glideserve log level."),
    ) -> None:
        """Serve POST /v1/images/generations (OpenAI-compatible), /metrics, and a playground at /."""
        from glideserve.server import ServerConfig
        from glideserve.server.loading import USER_ERRORS, LoadingApp, failure_message
        from glideserve.server.limits import HttpLimits
        from glideserve.server.run import DrainingServer, display_url, uvicorn_config

        logging.basicConfig(level=log_level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            config = ServerConfig(model_id=model_id_for(model[0]), api_key=api_key, max_queue=max_queue,
                                  warmup=warmup, default_slo_ms=default_slo_ms, public_url=public_url, docs=docs,
                                  dashboard=dashboard,
                                  lora_uploads=lora_uploads, max_lora_upload_bytes=int(max_lora_upload_mb * 2**20),
                                  limits=HttpLimits(drain_timeout_s=drain_timeout, header_timeout_s=header_timeout,
                                                    body_timeout_s=body_timeout,
                                                    keep_alive_timeout_s=keep_alive_timeout,
                                                    write_timeout_s=write_timeout, max_connections=max_connections))
            options = dict(max_batch_rows=max_batch_rows, max_waiting=max_queue, device=device, dtype=dtype)
            if system is System.glideserve:
                options.update(policy=policy.value, drop_late_after=parse_drop_late_after(drop_late_after),
                               max_paused=max_paused, admission_margin=admission_margin, profile=profile,
                               profile_cache=None if profile_cache is None else str(profile_cache),
                               default_cache=cache, full_slots=full_slots, cache_memory_mb=cache_memory_mb,
                               min_full_fraction=min_full_fraction,
                               latent_aware=latent_aware, lora_dir=None if lora_dir is None else str(lora_dir),
                               lora_memory_mb=lora_memory_mb,
                               **execution_options(compile, compile_mode, compile_buckets, attention, quantize,
                                                   gpu_memory_fraction, warm_size))
            elif compile or quantize or gpu_memory_fraction or attention != "auto":
                raise ValueError("--compile, --quantize, --attention and --gpu-memory-fraction apply to "
                                 "--system glideserve")
            cascade_config = None
            if cascade is not None:
                from glideserve.cascade.serving import CascadeConfig

                if system is not System.glideserve:
                    raise ValueError("--cascade runs on --system glideserve")
                cascade_config = CascadeConfig.parse(cascade)
                # Both stages are served: a --model NAME=PATH of the same name says where one loads from;
                # the heavy model goes first, as the default of requests that opt out of the cascade.
                given = {model_id_for(m): m for m in model} if model != [DEFAULT_MODEL] else {}
                stages = [cascade_config.heavy, cascade_config.light]
                model = [given.get(name, name) for name in stages] + [m for n, m in given.items() if n not in stages]
                config = dataclasses.replace(config, model_id=model_id_for(cascade_config.heavy))
            if data_dir is not None and (system is not System.glideserve or cascade is not None or lora_dir is None):
                raise ValueError("--data-dir (fine-tuning) needs --system glideserve, no --cascade, and --lora-dir "
                                 "for the adapters it produces")
            check_before_listening(system, model, options, max_loaded_models=max_loaded_models,
                                   weights_memory_gb=weights_memory_gb, offload_memory_gb=offload_memory_gb)
        except USER_ERRORS as exc:
            fail(failure_message(exc))

        def load(progress) -> object:
            """Runs while the server listens (LoadingApp): /ready reports ``progress`` meanwhile."""
            extra = {"startup": progress} if system is System.glideserve else {}
            backend = make_backend(system, model, max_loaded_models=max_loaded_models,
                                   weights_memory_gb=weights_memory_gb, offload_memory_gb=offload_memory_gb,
                                   **options, **extra)
            if data_dir is not None:
                data_dir.mkdir(parents=True, exist_ok=True)
                backend.attach_fine_tuning(str(data_dir))
            if cascade_config is not None:
                from glideserve.cascade.serving import build_cascade_backend

                backend = build_cascade_backend(backend, cascade_config, default_slo_ms)
            return backend

        if api_key is None and host not in LOOPBACK_HOSTS:
            typer.secho(f"warning: listening on {host} without --api-key; anyone who can reach this port can "
                        "generate images", fg=typer.colors.YELLOW, err=True)
        server: DrainingServer | None = None
        failures: list[BaseException] = []

        def announce() -> None:
            url = display_url(host, server.bound_port() or port)
            names = ", ".join(card["name"] for card in app.state.server.model_cards())
            typer.echo(f"glideserve: serving {names} ({system.value}) at {url}  "
                       f"(playground {url}/, API {url}/v1)", err=False)

        def stop(exc: BaseException) -> None:
            failures.append(exc)
            server.should_exit = True

        app = LoadingApp(load, config, on_ready=announce, on_failure=stop)
        server = DrainingServer(uvicorn_config(app, host, port, log_level.value), app)
        server.run()
        if failures:
            fail(failure_message(failures[0]), code=2 if isinstance(failures[0], USER_ERRORS) else 1)
        if server.started is False:
            raise typer.Exit(1)
