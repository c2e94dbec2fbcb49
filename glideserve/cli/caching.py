"""``glideserve bench caching``: the step-caching table (FLOPs, time, SSIM/PSNR against none, judge)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from glideserve.errors import GlideServeError


def bench_caching(
    model: Annotated[str, typer.Option(help="Bundled model name or folder (an SD3-family model).")] = "glide-small",
    steps: Annotated[Optional[list[int]], typer.Option("--steps", help="Step count (repeatable).")] = None,
    policy: Annotated[Optional[list[str]], typer.Option(
        "--policy", help="Cache policy to measure (repeatable; none is always measured first, as the reference).")] = None,
    latent_aware: Annotated[str, typer.Option(
        help="Latent-aware rows: 'both' (each policy with and without), 'off' or 'on'.")] = "both",
    captions: Annotated[int, typer.Option(help="Toy captions (0: every caption of the task).")] = 0,
    seeds: Annotated[int, typer.Option(help="Seeds per caption.")] = 2,
    inflight: Annotated[int, typer.Option(help="Requests in flight for the batched timing.")] = 8,
    alone: Annotated[int, typer.Option(help="Requests timed one at a time.")] = 4,
    flop_images: Annotated[int, typer.Option(help="Requests whose denoiser FLOPs are counted (alone).")] = 4,
    grid_captions: Annotated[int, typer.Option(help="Captions in the picture grid (seed 0).")] = 6,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder.")] = None,
) -> None:
    """Measure every cache policy on the toy task: transformer FLOPs per image, time alone and in flight,
    SSIM/PSNR against `none` with the same seeds, and judge accuracy."""
    from glideserve.bench.caching import DEFAULT_POLICIES, CacheConfig, markdown_table, run_caching_table
    from glideserve.bench.quality import toy_cases
    from glideserve.cache.policy import parse_cache_policy
    from glideserve.toy import dataset
    from glideserve.toy.grid import caption_grid

    if latent_aware not in ("both", "off", "on"):
        typer.echo("error: --latent-aware must be both, off or on", err=True)
        raise typer.Exit(2)
    try:
        policies = [str(parse_cache_policy(p)) for p in (policy or DEFAULT_POLICIES)]
        flags = {"both": (False, True), "off": (False,), "on": (True,)}[latent_aware]
        configs = [CacheConfig(p, flag) for p in dict.fromkeys(policies) for flag in flags]
        cases = toy_cases(captions or len(dataset.all_combinations()), seeds)
        out = out or Path("bench-results") / f"caching-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)

        def show(row) -> None:
            typer.echo(f"[{row.steps} steps] {row.config.label}: {row.transformer_gflops:.2f} GFLOPs/img, "
                       f"{row.alone_s:.3f} s alone, {row.inflight_s:.3f} s/img in flight, SSIM {row.ssim:.3f}, "
                       f"judge {row.judge_all}", err=True)

        rows, images = run_caching_table(model, steps or [20, 50], configs, cases, inflight=inflight, alone=alone,
                                         flop_images=flop_images, num_threads=threads, on_row=show)
    except GlideServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    (out / "caching.json").write_text(json.dumps({
        "model": model, "cases": len(cases), "seeds": seeds, "inflight": inflight,
        "rows": [r.as_dict() for r in rows]}, indent=1, allow_nan=False) + "\n")
    table = markdown_table(rows)
    (out / "caching.md").write_text(table + "\n")
    first_seed = [i for i, c in enumerate(cases) if c.seed == 0]
    step = max(1, len(first_seed) // max(1, grid_captions))
    shown = first_seed[::step][:grid_captions]  # spread over the captions, not the first few
    for n in sorted({r.steps for r in rows}):
        labels = [c.label for c in [CacheConfig("none"), *configs] if (c.label, n) in images]
        labels = list(dict.fromkeys(labels))
        cells = [images[(label, n)][i] for label in labels for i in shown]
        names = [label for label in labels for _ in shown]
        caption_grid(cells, names, columns=len(shown), scale=2).save(out / f"grid-{n}steps.png")
    typer.echo(table)
    typer.echo(f"results in {out}")


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("caching")(bench_caching)
