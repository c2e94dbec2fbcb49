"""``glideserve train-toy`` (train a bundled-size model) and ``glideserve eval judge`` (prompt adherence)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from glideserve.cli.errors import fail
from glideserve.errors import GlideServeError


def train_toy(
    size: str = typer.Option("small", "--size", help="Model: base (glide-base, the compositional scenes), turbo "
                             "(glide-turbo, distilled from a glide-base), small (glide-small) or tiny (glide-tiny) "
                             "(one shape)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./glide-SIZE)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Train the transformer for this many minutes."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Train the transformer for this many steps "
                                        "(default when neither is given: the size's recipe)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, initialisation and noise."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for torch."),
    vae_from: Optional[Path] = typer.Option(None, "--vae-from", help="Reuse the trained VAE of this model folder "
                                            "instead of training one."),
    vae_steps: Optional[int] = typer.Option(None, "--vae-steps", help="VAE training steps when not reusing one "
                                             "(default: the recipe's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out (steps count in total)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Continue from the weights (and VAE) of "
                                             "this model folder with a fresh optimizer, e.g. a shipped model."),
    samples_per_caption: int = typer.Option(150, "--samples-per-caption",
                                            help="shapes: images per caption in the fixed latent dataset."),
    scene_samples: int = typer.Option(40_000, "--scene-samples",
                                      help="scenes: images in the fixed latent dataset (all difficulty levels)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="turbo: the glide-base folder to distill "
                                           "(default: the bundled glide-base)."),
    pairs: int = typer.Option(4096, "--pairs", help="turbo: teacher samples (noise, image) to reflow on."),
) -> None:
    """Train a toy text-to-image model (shapes, colours, counts, sizes, relations) and write it in the
    diffusers SD3 layout."""
    import torch

    from glideserve.toy import recipe
    from glideserve.toy.train import DEFAULT_TRAIN_STEPS, DEFAULT_VAE_STEPS, SCENES_VAE_STEPS, train_toy_model

    if size not in recipe.PRESETS:
        fail(f"--size must be one of {', '.join(recipe.PRESETS)}, got {size!r}")
    if minutes is not None and steps is not None:
        fail("give --minutes or --steps, not both")
    counts = (minutes, steps, threads, vae_steps, samples_per_caption, scene_samples)
    if any(value is not None and value <= 0 for value in counts):
        fail("--minutes, --steps, --threads, --vae-steps, --samples-per-caption and --scene-samples must be positive")
    if minutes is None and steps is None:
        if size not in DEFAULT_TRAIN_STEPS:
            fail(f"--size {size} has no recorded step count yet; give --steps or --minutes")
        steps = DEFAULT_TRAIN_STEPS[size]
    torch.set_num_threads(threads)
    target = out if out is not None else Path(f"glide-{size}")
    if size == "turbo":
        from glideserve.models.loading import bundled_model_dir
        from glideserve.toy.distill import distill_turbo

        try:
            folder = distill_turbo(teacher or bundled_model_dir("glide-base"), target, steps=steps, minutes=minutes,
                                   pairs=pairs, seed=seed, resume=resume)
        except (FileNotFoundError, OSError) as exc:
            fail(str(exc))
        typer.echo(f"wrote {folder} (load it with `glideserve generate --model {folder}`)")
        return
    if vae_steps is None:
        vae_steps = SCENES_VAE_STEPS if recipe.PRESETS[size].task == "scenes" else DEFAULT_VAE_STEPS
    try:
        folder = train_toy_model(size, target, steps=steps, minutes=minutes, seed=seed, vae_from=vae_from,
                                 vae_steps=vae_steps, resume=resume, init_from=init_from,
                                 samples_per_caption=samples_per_caption, scene_samples=scene_samples)
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(f"wrote {folder} (load it with `glideserve generate --model {folder}`)")


def eval_judge(
    model: str = typer.Option("glide-base", "--model", help="Bundled model name or model folder."),
    task: str = typer.Option("scenes", "--task", help="scenes: a fixed sample of each difficulty of the "
                             "compositional task, scored per skill; shapes: every one-shape caption (168)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per image (default: the model's)."),
    seeds: int = typer.Option(2, "--seeds", help="Seeds per caption."),
    per_level: int = typer.Option(60, "--per-level", help="scenes: captions per difficulty level (a fixed "
                                  "sample; easy has 168, medium 840, hard 9,408)."),
    toy_clip: bool = typer.Option(True, "--toy-clip/--no-toy-clip", help="scenes: also the toy CLIP score and "
                                  "toy FID (the shipped toy CLIP)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale (default: the model's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report (with mismatches) here."),
    every: int = typer.Option(1, "--every", help="shapes: use every N-th caption combination (1: all 168)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    max_batch_rows: int = typer.Option(64, "--max-batch-rows", help="Engine batch bound (rows per step)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Save a captioned grid of the first images (PNG)."),
    grid_size: int = typer.Option(24, "--grid-size", help="How many images the grid shows."),
) -> None:
    """Prompt adherence of a toy model: generate the task's captions and judge each image."""
    from glideserve.toy.evaluate import evaluate_engine, evaluate_scenes, model_footprint

    from glideserve.toy import dataset

    if seeds < 1 or (steps is not None and steps < 1) or every < 1 or max_batch_rows < 1 or per_level < 1:
        fail("--seeds, --steps, --per-level, --every and --max-batch-rows must be at least 1")
    if task not in ("scenes", "shapes"):
        fail(f"--task must be scenes or shapes, got {task!r}")
    config = {"max_batch_rows": max_batch_rows}
    if threads is not None:
        config["num_threads"] = threads
    try:
        if task == "scenes":
            from glideserve.toy.contrastive import load_toy_clip

            report = evaluate_scenes(model, steps=steps, seeds=seeds, per_level=per_level, guidance=guidance,
                                     keep_images=grid is not None, toy_clip=load_toy_clip() if toy_clip else None,
                                     **config)
        else:
            report = evaluate_engine(model, steps=steps or 20, seeds=seeds, guidance=guidance,
                                     combinations=dataset.all_combinations()[::every], keep_images=grid is not None,
                                     **config)
    except GlideServeError as exc:
        fail(exc.message)
    typer.echo(f"{report.model}: {report.num_images} images, {report.steps} steps, guidance {report.guidance:g}")
    footprint = model_footprint(model)
    typer.echo(f"  {footprint['parameters'] / 1e6:.2f} M parameters ({footprint['transformer_parameters'] / 1e6:.2f} M "
               f"in the transformer), {footprint['disk_bytes'] / 2**20:.1f} MiB on disk")
    if task == "scenes":
        _print_levels(report.levels)
    else:
        acc = report.accuracy
        typer.echo(f"  background {acc['background']:.3f}  color {acc['color']:.3f}  shape {acc['shape']:.3f}  "
                   f"all three {acc['all']:.3f}")
    typer.echo(f"  {report.seconds_per_image:.3f} s/image ({report.seconds:.1f} s total)")
    if grid is not None:
        _save_grids(grid, report.images, grid_size, by_level=task == "scenes")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**report.as_dict(), **footprint}, indent=2) + "\n")


def eval_vae(
    model: str = typer.Option("glide-base", "--model", help="Bundled model name or model folder."),
    per_level: int = typer.Option(100, "--per-level", min=1, help="Fresh dataset scenes per difficulty level."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
) -> None:
    """The judge on the model's autoencoder round trips (encode, decode) of dataset scenes, per level:
    the most any transformer decoding through it can score."""
    from glideserve.toy.evaluate import evaluate_autoencoder

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        report = evaluate_autoencoder(model, per_level)
    except (FileNotFoundError, GlideServeError) as exc:
        fail(getattr(exc, "message", str(exc)))
    typer.echo(f"{report.model} autoencoder: {per_level} scenes per level, mean error "
               f"{report.mean_abs_error:.2f}/255")
    _print_levels(report.levels)


def _save_grids(grid: Path, images: list, size: int, by_level: bool) -> None:
    """A captioned grid spread over the images; for the scenes, one per difficulty (GRID-easy.png, ...)."""
    from glideserve.toy.grid import caption_grid

    groups = {grid: images}
    if by_level:
        from glideserve.toy.scenes import parse_caption

        groups = {}
        for image, text in images:
            level = parse_caption(text).difficulty
            groups.setdefault(grid.with_name(f"{grid.stem}-{level}{grid.suffix}"), []).append((image, text))
    grid.parent.mkdir(parents=True, exist_ok=True)
    for path, group in groups.items():
        # Spread the grid over the captions instead of showing the first few colours only.
        count = min(size, len(group))
        pick = [group[i * (len(group) - 1) // max(1, count - 1)] for i in range(count)]
        caption_grid([image for image, _ in pick], [text for _, text in pick]).save(path)
        typer.echo(f"wrote {path}")


def _print_levels(levels: dict[str, dict[str, float]]) -> None:
    from glideserve.toy.scene_judge import SKILLS

    columns = [*SKILLS, "all", "toy_clip_score", "toy_fid"]
    typer.echo("  level     " + " ".join(f"{c[:10]:>10}" for c in columns) + "      n")
    for level, row in levels.items():
        cells = [f"{row[c]:10.3f}" if c in row else f"{'-':>10}" for c in columns]
        typer.echo(f"  {level:<9} " + " ".join(cells) + f" {int(row['n']):6d}")


def train_toy_clip(
    out: Path = typer.Option(Path("toy_clip"), "--out", help="Output folder (the shipped one is "
                             "glideserve/data/toy_clip)."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Training steps (batches of fresh scenes)."),
    batch_size: int = typer.Option(128, "--batch-size", min=2, help="Scenes per batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and initialisation."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for torch."),
) -> None:
    """Train the toy CLIP (image and text encoders for the toy CLIP score and toy FID) on the scenes."""
    import torch

    from glideserve.toy.contrastive import retrieval_accuracy, save_toy_clip, train_toy_clip as train

    torch.set_num_threads(threads)
    model = train(steps=steps, batch_size=batch_size, seed=seed)
    save_toy_clip(model, out)
    for level, accuracy in retrieval_accuracy(model).items():
        typer.echo(f"{level}: right caption ranked first for {accuracy:.3f} of held-out images")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``train-toy`` and ``train-toy-clip`` to the app and ``judge`` to the eval group."""
    app.command("train-toy")(train_toy)
    app.command("train-toy-clip")(train_toy_clip)
    eval_app.command("judge")(eval_judge)
    eval_app.command("vae")(eval_vae)
