"""``glideserve bench compile``: compiled against eager denoising steps on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from glideserve.cli.errors import fail
from glideserve.errors import GlideServeError


def _counts(text: str | None, option: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated row counts such as 1,4,16, got {text!r}") from None


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("compile")
    def compile_bench(
        model: str = typer.Option("glide-small", help="Bundled model name or diffusers folder."),
        rows: str = typer.Option("1,4,16", help="Row counts to measure; each is a compiled bucket."),
        padded: Optional[str] = typer.Option(None, help="Extra row counts that are not buckets (padded up to the "
                                                        "next one), e.g. 3,12."),
        steps: int = typer.Option(20, min=2, max=200, help="Denoising steps per request."),
        repeats: int = typer.Option(3, min=1, max=50, help="Runs per row count and engine, alternated."),
        size: Optional[str] = typer.Option(None, help="Image size WIDTHxHEIGHT (default: the model's)."),
        threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
        out: Optional[Path] = typer.Option(None, help="JSON file for the result."),
    ) -> None:
        """Step time of --compile against eager at several row counts, compile time and graph count."""
        import torch

        from glideserve.bench.compile_run import markdown_table, run_compile_bench
        from glideserve.params import parse_size

        if threads:
            torch.set_num_threads(threads)
        try:
            parsed = parse_size(size) if size else None
            result = run_compile_bench(model, _counts(rows, "--rows"), _counts(padded, "--padded"), steps, repeats,
                                       parsed, progress=lambda line: typer.echo(line, err=True))
        except GlideServeError as exc:
            fail(exc.message)
        except ValueError as exc:
            fail(str(exc))
        result["threads"] = torch.get_num_threads()
        typer.echo(markdown_table(result))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            typer.echo(f"wrote {out}", err=True)
