"""``glideserve cluster up|down|check``: the OpenAI API on Ray Serve replicas (the ``cluster`` extra)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from glideserve.cli.errors import fail

POINTER_DIR_ENV = "XDG_STATE_HOME"


def _pointer(app_name: str) -> Path:
    """Where ``up`` notes its run folder, so ``down`` finds it without being told."""
    base = os.environ.get(POINTER_DIR_ENV) or Path.home() / ".local" / "state"
    return Path(base) / "glideserve" / f"cluster-{app_name}.json"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process its parent has not reaped yet counts as stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): the signal test is all there is
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _load(config: Path, address: str | None = None):
    """The validated config; on a local instance (no Ray address) every model must also resolve here."""
    from glideserve.cluster.config import ClusterConfigError, load_config
    from glideserve.errors import ModelLoadError

    try:
        cfg = load_config(config)
    except ClusterConfigError as exc:
        fail(str(exc))
    if address is None and cfg.ray.address is None:  # a remote cluster resolves paths on its nodes
        from glideserve.models.loading import resolve_model_path

        for index, model in enumerate(cfg.models):
            try:
                resolve_model_path(model.source)
            except ModelLoadError as exc:
                fail(f"{config}: models.{index}.path: {exc.message}")
    return cfg


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    cluster_app = typer.Typer(no_args_is_help=True, help="Serve on Ray Serve: model replicas behind the same API.")
    app.add_typer(cluster_app, name="cluster")

    @cluster_app.command("check")
    def check(config: Path = typer.Option(..., "--config", "-c", help="cluster.yaml to validate.")) -> None:
        """Validate a cluster.yaml without starting anything."""
        cfg = _load(config)
        models = ", ".join(f"{m.name} x{m.replicas.min}..{m.replicas.max}" for m in cfg.models)
        typer.echo(f"ok: {models}; allocator {cfg.allocation_policy}"
                   + (f"; cascade {cfg.cascade.light} -> {cfg.cascade.heavy}" if cfg.cascade else ""))

    @cluster_app.command("up")
    def up(
        config: Path = typer.Option(..., "--config", "-c", help="cluster.yaml: models, replicas, cascade, "
                                    "allocator, SLO, API key (see docs/cluster.md)."),
        run_dir: Optional[Path] = typer.Option(None, help="Folder for the local Ray instance's files and the "
                                               "state `down` reads (default: ray.run_dir, else a new temporary "
                                               "folder)."),
        address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting a local one."),
        ready_timeout: float = typer.Option(600.0, min=1, help="Seconds to wait for every replica to be ready."),
        log_level: str = typer.Option("warning", help="Log level of this process."),
    ) -> None:
        """Deploy on Ray Serve and serve until SIGTERM or Ctrl-C, which drain (admitted requests finish)."""
        cfg = _load(config, address)
        if address is not None:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from glideserve.cluster.runtime import ClusterRuntime

        runtime = ClusterRuntime(cfg, run_dir)
        started = time.monotonic()
        try:
            url = runtime.up(ready_timeout_s=ready_timeout)
        except (TimeoutError, RuntimeError, ValueError) as exc:
            fail(f"the deployment did not start: {exc}", code=1)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
            signal.signal(sig, lambda *_: stop.set())
        pointer = _pointer(cfg.app_name)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"run_dir": str(runtime.run_dir.resolve())}) + "\n", encoding="utf-8")
        typer.echo(f"glideserve cluster: serving {', '.join(m.name for m in cfg.models)} at {url} "
                   f"(ready in {time.monotonic() - started:.0f} s); stop with Ctrl-C or "
                   f"`glideserve cluster down --run-dir {runtime.run_dir}`")
        sys.stdout.flush()  # the ready line is what scripts wait for
        stop.wait()
        typer.echo("glideserve cluster: draining (admitted requests finish), then stopping")
        try:
            runtime.down()
        finally:
            pointer.unlink(missing_ok=True)
        typer.echo("glideserve cluster: stopped")

    @cluster_app.command("down")
    def down(
        run_dir: Optional[Path] = typer.Option(None, help="The run folder `up` printed (default: the last `up` "
                                               "of --app on this machine)."),
        app_name: str = typer.Option("glideserve", "--app", help="The app_name of the deployment."),
        timeout: float = typer.Option(300.0, min=1, help="Seconds to wait for the drain and the stop."),
    ) -> None:
        """Stop a deployment `up` started: it drains (admitted requests finish), then exits."""
        from glideserve.cluster.runtime import STATE_FILE

        if run_dir is None:
            pointer = _pointer(app_name)
            if not pointer.is_file():
                fail(f"no running deployment of app {app_name!r} is recorded on this machine; pass --run-dir")
            run_dir = Path(json.loads(pointer.read_text(encoding="utf-8"))["run_dir"])
        state_file = run_dir / STATE_FILE
        if not state_file.is_file():
            fail(f"{run_dir} holds no running deployment ({STATE_FILE} is missing)")
        pid = int(json.loads(state_file.read_text(encoding="utf-8"))["pid"])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            state_file.unlink(missing_ok=True)
            fail(f"the deployment's process {pid} is not running (stale state removed)", code=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                typer.echo("glideserve cluster: stopped")
                return
            time.sleep(0.5)
        fail(f"the deployment's process {pid} is still draining after {timeout:.0f} s", code=1)

    @bench_app.command("cluster")
    def bench_cluster(
        model: str = typer.Option("glide-small", help="Bundled model name or folder."),
        replicas: str = typer.Option("1,2", help="Replica counts to measure, comma-separated."),
        cpus: int = typer.Option(2, min=1, help="CPUs every system gets (split evenly between replicas)."),
        requests: int = typer.Option(64, min=1, max=10_000, help="Generations per measured burst."),
        warmup: int = typer.Option(8, min=0, help="Generations sent before measuring."),
        out: Optional[Path] = typer.Option(None, help="JSON file for the results."),
        run_dir: Optional[Path] = typer.Option(None, help="Folder for the servers' logs and Ray's files "
                                               "(default: a new temporary folder)."),
    ) -> None:
        """Throughput of the Ray Serve deployment at each replica count beside `glideserve serve`, one run."""
        import tempfile

        from glideserve.bench import cluster_run

        try:
            counts = [int(r) for r in replicas.split(",") if r.strip()]
        except ValueError:
            fail(f"--replicas takes whole numbers separated by commas, got {replicas!r}")
        if not counts or min(counts) < 1:
            fail("--replicas needs at least one count >= 1")
        folder = run_dir or Path(tempfile.mkdtemp(prefix="glideserve-bench-cluster-"))
        rows = cluster_run.run(model, counts, cpus, requests, warmup, out, folder)
        base = next((r for r in rows if r["system"] != "glideserve serve" and r["replicas"] == 1), rows[0])
        typer.echo(f"{'system':<22}{'replicas':>9}{'images/s':>10}{'p50 s':>8}{'x 1 replica':>13}")
        for row in rows:
            typer.echo(f"{row['system']:<22}{row['replicas']:>9}{row['images_per_s']:>10.2f}"
                       f"{row['p50_s'] or float('nan'):>8.2f}{row['images_per_s'] / base['images_per_s']:>13.2f}")
