"""The ``glideserve`` command line: one typer app, each command group in its own module."""

from __future__ import annotations

import typer

from glideserve.cli import (bench, caching, cascade, cluster, finetune, generate, performance, profile, quality, serve,
                            toy)

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Step-level serving engine for text-to-image diffusion models.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure image quality and prompt adherence.")
bench_app = typer.Typer(no_args_is_help=True, help="Latency, throughput and load benchmarks.")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

for module in (generate, serve, profile, toy, bench, performance, caching, quality, cascade, cluster, finetune):
    module.register(app, eval_app=eval_app, bench_app=bench_app)


# Packages only an extra installs (pyproject.toml), and which: a command that needs one says how to get it.
EXTRA_OF_PACKAGE = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "multipart": "serve",
                    "scipy": "serve", "httpx": "bench", "matplotlib": "bench", "torchmetrics": "bench",
                    "psutil": "bench", "ray": "cluster", "yaml": "cluster",
                    "peft": "finetune"}


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_PACKAGE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        typer.secho(f"error: this command needs the package {exc.name!r}, which the {extra!r} extra installs: "
                    f"pip install -e '.[{extra}]' (or 'glideserve[{extra}]')", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
