"""``glideserve eval quality``: each system's images against diffusers' own pipeline run alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glideserve.cli.errors import fail
from glideserve.cli.execution import AttentionOpt, CompileBucketsOpt, CompileOpt, QuantizeOpt, execution_options
from glideserve.errors import GlideServeError

DEFAULT_TOY_CAPTIONS = 8


def _judge_cell(accuracy: dict | None) -> str:
    if accuracy is None:
        return "n/a"
    return (f"{accuracy['all']:.2f} (bg {accuracy['background']:.2f} / color {accuracy['color']:.2f} / "
            f"shape {accuracy['shape']:.2f})")


def quality_table(report) -> str:
    """Markdown table: the reference row first, then one row per system."""
    from glideserve.bench.report import fmt, markdown_table

    header = ["system", "images", "SSIM", "PSNR (dB)", "max diff", "judge all (fields)", "CLIP", "FID"]
    rows = []
    for entry in [report.reference, *report.systems]:
        c = entry.comparison
        if c is None:
            pixel = ["(reference)"] * 3
        else:
            pixel = [f"{c.ssim:.4f}", "inf (identical)" if c.identical else fmt(c.psnr), str(c.max_abs_diff)]
        rows.append([entry.system, str(entry.num_images), *pixel, _judge_cell(entry.judge),
                     fmt(entry.clip_score), fmt(entry.fid)])
    return markdown_table(header, rows)


def levels_table(report) -> str:
    """Per system and difficulty: the judge's all-correct, toy CLIP score and toy FID."""
    from glideserve.bench.report import markdown_table

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    rows = [[entry.system, level, fmt(row.get("all")), fmt(row.get("toy_clip_score")), fmt(row.get("toy_fid")),
             str(int(row["n"]))]
            for entry in (report.reference, *report.systems) for level, row in (entry.levels or {}).items()]
    return markdown_table(["system", "level", "judge all", "toy CLIP score", "toy FID", "images"], rows)


def eval_quality(
    model: Annotated[str, typer.Option("--model", help="Bundled model name, diffusers folder or checkpoint.")],
    system: Annotated[Optional[list[str]], typer.Option(
        "--system", help="System to compare with the reference: glideserve, diffusers-sequential or "
                         "request-batching (repeat for several; default: glideserve).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Text file with one prompt per line (instead of toy captions).")] = None,
    toy_captions: Annotated[Optional[int], typer.Option(
        "--toy-captions", help=f"Use N toy captions 'a {{color}} {{shape}} on a {{background}} background', "
                               f"judged for prompt adherence (default: {DEFAULT_TOY_CAPTIONS}).")] = None,
    scene_captions: Annotated[Optional[int], typer.Option(
        "--scene-captions", help="Use a fixed sample of N captions per difficulty of the compositional task, "
                                 "scored per level: judge skills, toy CLIP score and toy FID.")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (seeds 0..K-1).")] = 1,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        "--guidance", help="Guidance scale (default: the model's).")] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="WIDTHxHEIGHT (default: the model's).")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the numbers and per-image records here.")] = None,
    clip_model: Annotated[Optional[Path], typer.Option(
        "--clip-model", help="Local CLIP model folder; enables the CLIP score.")] = None,
    fid_weights: Annotated[Optional[Path], typer.Option(
        "--fid-weights", help="FID Inception-v3 weights (PyTorch state dict) on local disk; enables FID. "
                              "Pass only files you trust: the FID library unpickles them.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", help="Save every image as OUT_DIR/<system>/NNNN.png.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    max_batch_rows: Annotated[Optional[int], typer.Option(
        "--max-batch-rows", help="Batch bound (rows per step) of the engine and the batching baseline.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    compile: CompileOpt = False,
    compile_buckets: CompileBucketsOpt = None,
    attention: AttentionOpt = "auto",
    quantize: QuantizeOpt = None,
) -> None:
    """Compare each system's images with diffusers' own pipeline run alone per request (the exact reference).

    SSIM, PSNR and largest pixel difference; toy-judge accuracy for toy captions; CLIP / FID with local weights.
    --compile, --attention and --quantize apply to the glideserve system (the reference stays exact).
    """
    from glideserve.bench import quality
    from glideserve.bench.loadgen import read_prompts
    from glideserve.bench.reference_free import ReferenceFreeMetrics
    from glideserve.params import parse_size

    systems = list(dict.fromkeys(system or [quality.ENGINE_SYSTEM]))
    unknown = [name for name in systems if name not in quality.SYSTEMS]
    if unknown:
        fail(f"unknown system {unknown[0]!r}; choose from {', '.join(quality.SYSTEMS)}")
    if sum(option is not None for option in (prompts, toy_captions, scene_captions)) > 1:
        fail("give one of --prompts, --toy-captions and --scene-captions")
    for name, value in (("--seeds", seeds), ("--steps", steps), ("--threads", threads),
                        ("--max-batch-rows", max_batch_rows)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, got {value}")
    config = {k: v for k, v in (("num_threads", threads), ("max_batch_rows", max_batch_rows)) if v is not None}
    try:
        toy_clip = None
        if prompts is not None:
            cases = quality.prompt_cases(read_prompts(prompts), seeds)
        elif scene_captions is not None:
            from glideserve.toy.contrastive import load_toy_clip

            cases, toy_clip = quality.scene_cases(scene_captions, seeds), load_toy_clip()
        else:
            cases = quality.toy_cases(DEFAULT_TOY_CAPTIONS if toy_captions is None else toy_captions, seeds)
        hw = parse_size(size) if size is not None else None
        # Load the optional metric weights before generating anything, so a bad path fails at once.
        metrics = ReferenceFreeMetrics(clip_model, fid_weights)
        execution = execution_options(compile, "default", compile_buckets, attention, quantize)
        generators = {name: quality.system_generator(
            name, model, **config, **(execution if name == quality.ENGINE_SYSTEM else {})) for name in systems}
        report = quality.run_quality(model, cases, generators, steps=steps, guidance=guidance, size=hw,
                                     metrics=metrics, out_dir=out_dir, progress=progress, num_threads=threads,
                                     toy_clip=toy_clip)
    except GlideServeError as exc:
        fail(exc.message)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    s = report.settings
    typer.echo(f"{report.model}: {s['num_cases']} images per system, {s['steps']} steps, guidance "
               f"{s['guidance']:g}, {s['width']}x{s['height']}, sampler {s['sampler']}; reference: the diffusers "
               "pipeline run alone per request")
    typer.echo(quality_table(report), nl=False)
    if report.reference.levels is not None:
        typer.echo(levels_table(report), nl=False)
    for metric, note in report.notes.items():
        typer.echo(f"{metric}: {note}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: an infinite PSNR must already be null plus ``identical: true``.
        json_out.write_text(json.dumps(report.as_dict(), indent=2, allow_nan=False) + "\n")
        typer.echo(f"wrote {json_out}")
    if out_dir is not None:
        typer.echo(f"images under {out_dir}")


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``quality`` to the eval group."""
    eval_app.command("quality")(eval_quality)
