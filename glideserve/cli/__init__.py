"""The ``glideserve`` command line: one typer app, each command group in its own module."""

from __future__ import annotations

import typer

from glideserve.cli import bench, caching, cascade, generate, profile, quality, serve, toy

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Step-level serving engine for text-to-image diffusion models.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure image quality and prompt adherence.")
bench_app = typer.Typer(no_args_is_help=True, help="Latency, throughput and load benchmarks.")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

for module in (generate, serve, profile, toy, bench, caching, quality, cascade):
    module.register(app, eval_app=eval_app, bench_app=bench_app)


def main() -> None:
    app()
