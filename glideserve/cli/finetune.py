"""``glideserve finetune`` (offline LoRA training), ``glideserve concept-dataset`` and ``eval concept``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from glideserve.cli.errors import fail
from glideserve.errors import GlideServeError
from glideserve.models import DEFAULT_MODEL


def _load_family(model: str, threads: Optional[int]):
    from glideserve.config import EngineConfig
    from glideserve.engine.core import EngineCore
    from glideserve.models.loading import resolve_model_path

    config = EngineConfig.from_kwargs(profile=False, num_threads=threads)
    return EngineCore.from_pretrained(str(resolve_model_path(model)), config, name=model).runner.family


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        model: str = typer.Option(DEFAULT_MODEL, help="Bundled model name or diffusers folder to adapt."),
        data: Path = typer.Option(..., help="Folder of image + caption pairs (a.png + a.txt)."),
        out: str = typer.Option(..., help="Name of the adapter: written as LORA_DIR/NAME.safetensors."),
        lora_dir: Path = typer.Option(Path("loras"), help="Folder to write the adapter to (serve it with "
                                      "`glideserve serve --lora-dir`)."),
        rank: int = typer.Option(8, help="LoRA rank."),
        alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default: the rank)."),
        target: List[str] = typer.Option(["to_q", "to_k", "to_v", "to_out.0"], help="Target linear layers "
                                         "(repeat)."),
        steps: int = typer.Option(200, help="Optimizer steps."),
        batch_size: int = typer.Option(4, help="Samples per step."),
        learning_rate: float = typer.Option(1e-3, help="AdamW learning rate."),
        seed: int = typer.Option(0, help="Seed of every random draw (same seed, same adapter)."),
        checkpoint_every: int = typer.Option(50, help="Steps between checkpoints (resumed on a rerun)."),
        threads: Optional[int] = typer.Option(None, min=1, help="Torch threads."),
    ) -> None:
        """Train a LoRA adapter on a folder of image + caption pairs, with a progress bar; a rerun resumes
        from the last checkpoint (LORA_DIR/NAME.checkpoint.safetensors)."""
        from tqdm import tqdm

        from glideserve.finetune.dataset import read_pairs
        from glideserve.finetune.trainer import FineTuneConfig, LoRATrainer

        try:
            config = FineTuneConfig(model=model, dataset=str(data), adapter_name=out, rank=rank, alpha=alpha,
                                    target_modules=tuple(target), steps=steps, batch_size=batch_size,
                                    learning_rate=learning_rate, seed=seed, checkpoint_every=checkpoint_every)
            if not data.is_dir():
                raise GlideServeError(f"--data {data} is not a folder")
            pairs = read_pairs(data)
            trainer = LoRATrainer(_load_family(model, threads), config, pairs)
        except GlideServeError as exc:
            fail(exc.message)
        lora_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = lora_dir / f"{out}.checkpoint.safetensors"
        if checkpoint.is_file():
            try:
                trainer.load_checkpoint(checkpoint)
            except ValueError as exc:
                fail(f"{exc}; delete it to start over")
            typer.echo(f"resuming from step {trainer.state.step} ({checkpoint})")
        with tqdm(total=steps, initial=trainer.state.step, unit="step", desc=f"training {out}") as bar:
            while not trainer.done:
                loss = trainer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if trainer.state.step % checkpoint_every == 0:
                    trainer.save_checkpoint(checkpoint)
        trainer.export(lora_dir / f"{out}.safetensors")
        checkpoint.unlink(missing_ok=True)
        typer.echo(f"wrote {lora_dir / (out + '.safetensors')} ({len(pairs)} pairs, {steps} steps, final loss "
                   f"{sum(trainer.state.losses[-20:]) / len(trainer.state.losses[-20:]):.4f} over the last 20)")

    @app.command("concept-dataset")
    def concept_dataset(color: str = typer.Option("pink", help="The new colour to teach."),
                        count: int = typer.Option(240, min=1, max=10_000), seed: int = typer.Option(0),
                        prior: int = typer.Option(0, min=0, max=10_000, help="Pairs of the known colours to "
                                                  "mix in (prior preservation)."),
                        out: Path = typer.Option(..., help="New folder for the pairs.")) -> None:
        """Write a fine-tuning dataset of a colour the bundled models never saw (shapes in that colour)."""
        from glideserve.toy.concept import write_concept_dataset

        try:
            write_concept_dataset(out, color, count, seed, prior)
        except (ValueError, FileExistsError) as exc:
            fail(str(exc))
        typer.echo(f"wrote {count + prior} pairs to {out}")

    @eval_app.command("concept")
    def eval_concept(
        model: str = typer.Option(DEFAULT_MODEL), lora_dir: Path = typer.Option(...),
        lora: str = typer.Option(..., help="The adapter's name in --lora-dir."),
        color: str = typer.Option("pink"), seeds: int = typer.Option(4, min=1, max=64),
        old_per_color: int = typer.Option(1, min=1, max=7, help="Old captions per colour and shape."),
        out: Optional[Path] = typer.Option(None, help="JSON file for the results."),
    ) -> None:
        """The judge on the new concept and on old captions, with and without the adapter (same seeds)."""
        from glideserve.toy.evaluate_concept import evaluate_concept

        try:
            report = evaluate_concept(model, lora_dir, lora, color, seeds, old_per_color)
        except (GlideServeError, ValueError) as exc:
            fail(getattr(exc, "message", str(exc)))
        typer.echo(f"{'captions':<10}{'adapter':<9}{'images':>7}{'all':>7}{'color':>7}{'shape':>7}{'bg':>7}")
        for row in report["rows"]:
            typer.echo(f"{row['captions']:<10}{row['adapter']:<9}{row['images']:>7}{row['all']:>7.3f}"
                       f"{row['color']:>7.3f}{row['shape']:>7.3f}{row['background']:>7.3f}")
        if out is not None:
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    @bench_app.command("finetune")
    def bench_finetune(
        model: str = typer.Option(DEFAULT_MODEL),
        trace: str = typer.Option("maf_trace_1to8qps.csv", help="Trace CSV: a path or a bundled trace's name."),
        factor: float = typer.Option(0.8, min=0.01, max=10, help="Offered load as a multiple of the capacity "
                                     "(1 / the isolated latency)."),
        duration: float = typer.Option(45.0, min=5, help="Seconds the trace is fitted into."),
        slo_scale: float = typer.Option(5.0, min=1, help="SLO as a multiple of the isolated latency."),
        idle: float = typer.Option(15.0, min=1, help="Seconds the job's idle speed is measured."),
        out: Optional[Path] = typer.Option(None, help="JSON file for the results."),
    ) -> None:
        """SLO attainment under a trace without and with a fine-tuning job, and the job's steps/min idle and
        under load (one run, fresh servers)."""
        from glideserve.bench import finetune_run
        from glideserve.cli.cascade import BUNDLED_TRACES, resolve_trace

        path = resolve_trace(trace)
        if not path.is_file():
            fail(f"no trace {trace!r}: give a CSV path or one of {', '.join(p.name for p in BUNDLED_TRACES.glob('*.csv'))}")
        rows = finetune_run.run(model, path, factor, duration, slo_scale, idle, out)
        typer.echo(f"{'phase':<10}{'requests':>9}{'on time':>8}{'late':>6}{'refused':>8}{'dropped':>8}"
                   f"{'SLO att.':>9}{'job steps/min idle':>20}{'under load':>12}")
        for r in rows:
            typer.echo(f"{r['phase']:<10}{r['requests']:>9}{r['on_time']:>8}{r['late']:>6}{r['refused']:>8}"
                       f"{r['dropped']:>8}{r['slo_attainment']:>9.3f}{r.get('job_steps_per_min_idle', ''):>20}"
                       f"{r.get('job_steps_per_min_under_load', ''):>12}")
