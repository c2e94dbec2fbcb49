"""``glideserve profile``: measure (or load) a model's latency profile and print it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from glideserve.cli.errors import fail
from glideserve.errors import GlideServeError
from glideserve.models import DEFAULT_MODEL



def profile_rows(profile) -> list[dict]:
    """Printable rows: one per (size, rows) step point, then prefill and decode points."""
    rows = [{"what": "step", "tokens_per_row": p["tokens_per_row"], "n": p["rows"], "ms": p["step_ms"],
             "ms_each": p["ms_per_row"]} for p in profile.table()]
    for n, seconds in profile.prefill.points.items():
        rows.append({"what": "prefill", "tokens_per_row": None, "n": n, "ms": seconds * 1e3,
                     "ms_each": seconds * 1e3 / n})
    for tokens, curve in sorted(profile.decode.items()):
        for n, seconds in curve.points.items():
            rows.append({"what": "decode", "tokens_per_row": tokens, "n": n, "ms": seconds * 1e3,
                         "ms_each": seconds * 1e3 / n})
    return rows


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``profile`` to the app."""

    @app.command("profile")
    def profile(
        model: str = typer.Option(DEFAULT_MODEL, help="Bundled model name or a diffusers model folder."),
        size: Optional[list[str]] = typer.Option(None, help="Image size WIDTHxHEIGHT (repeatable; default: the "
                                                            "model's default size)."),
        max_batch_rows: int = typer.Option(16, min=1, help="Largest batch to measure, in model rows."),
        profile_cache: Optional[Path] = typer.Option(None, help="JSON cache of profiles (default: under the "
                                                                "user's cache directory)."),
        refresh: bool = typer.Option(False, help="Measure again even when the cache has this profile."),
        device: str = typer.Option("cpu", help="Torch device, e.g. cpu or cuda."),
        dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
        as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON instead of a table."),
    ) -> None:
        """Measure the step, prefill and decode latencies the scheduler plans with, and print them."""
        from glideserve.config import EngineConfig
        from glideserve.engine.core import EngineCore
        from glideserve.engine.profiling import load_or_measure
        from glideserve.params import parse_size

        logging.basicConfig(level="WARNING")
        try:
            sizes = tuple(parse_size(s) for s in size or ())
            config = EngineConfig.from_kwargs(max_batch_rows=max_batch_rows, device=device, dtype=dtype,
                                              profile_cache=str(profile_cache) if profile_cache else None,
                                              profile_sizes=sizes)
            core = EngineCore.load(model, config=config)
            result = load_or_measure(model, core.runner, core.spec, core.config, refresh=refresh,
                                     progress=lambda message: typer.echo(f"profiling {message}", err=True))
        except (GlideServeError, ValueError) as exc:
            fail(getattr(exc, "message", str(exc)))
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=1))
            return
        typer.echo(f"{'stage':<8} {'tokens/row':>10} {'n':>4} {'ms':>9} {'ms each':>9}")
        for row in profile_rows(result):
            tokens = "" if row["tokens_per_row"] is None else row["tokens_per_row"]
            typer.echo(f"{row['what']:<8} {tokens:>10} {row['n']:>4} {row['ms']:>9.2f} {row['ms_each']:>9.2f}")
