"""``glideserve generate``: one prompt or a file of prompts through the step-level engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glideserve.cli.errors import fail
from glideserve.cli.execution import (AttentionOpt, CompileBucketsOpt, CompileModeOpt, CompileOpt, QuantizeOpt,
                                     execution_options)
from glideserve.errors import GlideServeError, InvalidRequestError
from glideserve.params import GenerationParams, parse_size
from glideserve.models import DEFAULT_MODEL

MAX_PROMPTS_PER_FILE = 10_000


class PromptFileEntry(BaseModel):
    """One request object in a ``--prompts-file`` JSON list."""

    prompt: str
    negative_prompt: Optional[str] = None
    steps: Optional[int] = Field(None, alias="num_inference_steps")
    guidance: Optional[float] = Field(None, alias="guidance_scale")
    seed: Optional[int] = None
    size: Optional[str] = None
    sampler: Optional[str] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def read_prompts_file(path: Path) -> list[PromptFileEntry]:
    """Plain text (one prompt per line), a JSON list of prompts, or a JSON list of request objects."""
    if not path.is_file():
        raise InvalidRequestError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"{path} looks like JSON but does not parse: {exc}") from exc
        try:
            entries = [PromptFileEntry(prompt=i) if isinstance(i, str) else PromptFileEntry.model_validate(i)
                       for i in items]
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequestError(f"{path}: bad request object ({where}: {first['msg']})") from exc
    else:
        entries = [PromptFileEntry(prompt=line.strip()) for line in text.splitlines() if line.strip()]
    if not entries:
        raise InvalidRequestError(f"{path} holds no prompts")
    if len(entries) > MAX_PROMPTS_PER_FILE:
        raise InvalidRequestError(f"{path} holds {len(entries)} prompts; the limit is {MAX_PROMPTS_PER_FILE}")
    return entries


def _lora_option(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE``."""
    name, sep, scale = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return (name, float(scale)) if sep else (text, 1.0)
    except ValueError:
        fail(f"--lora {text!r}: give NAME or NAME:SCALE with a number as SCALE")


def _params(entry: PromptFileEntry, index: int, defaults: dict) -> GenerationParams:
    size = entry.size or defaults["size"]
    height, width = parse_size(size) if size else (None, None)
    seed = entry.seed if entry.seed is not None else (None if defaults["seed"] is None else defaults["seed"] + index)
    return GenerationParams(
        prompt=entry.prompt, negative_prompt=entry.negative_prompt if entry.negative_prompt is not None
        else defaults["negative"], num_inference_steps=entry.steps if entry.steps is not None else defaults["steps"],
        guidance_scale=entry.guidance if entry.guidance is not None else defaults["guidance"], seed=seed,
        height=height, width=width, sampler=entry.sampler or defaults["sampler"], lora=defaults["lora"])


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt (omit when using --prompts-file)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Bundled model name, diffusers folder or .safetensors file."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (1..200); default: the model's."),
    seed: Optional[int] = typer.Option(None, help="Random seed; with --prompts-file, prompt i gets seed+i."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (1 disables it)."),
    size: Optional[str] = typer.Option(None, help="Image size WIDTHxHEIGHT, e.g. 64x64."),
    negative: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    sampler: Optional[str] = typer.Option(None, help="Sampler: flow_euler (SD3); ddim, euler, euler_a, dpmpp_2m, pndm (UNet)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (one prompt) or folder (--prompts-file)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text file (one prompt per line) or JSON list of prompts/request objects."),
    max_batch_rows: int = typer.Option(16, help="Most model rows per step (a guided request takes 2)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    config: Optional[str] = typer.Option(None, "--config", help="Diffusers folder with configs for a single-file checkpoint."),
    allow_unsafe_pickle: bool = typer.Option(False, help="Allow loading pickled .ckpt/.pt files (runs code from the file!)."),
    cache: str = typer.Option("none", help="Step caching: none (exact), glideserve:N, fora:N, taylorseer:N, "
                                           "teacache:T or fbcache:T."),
    latent_aware: bool = typer.Option(False, help="Latent-aware denoising (SD3 models)."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="LoRA adapter NAME or NAME:SCALE from --lora-dir "
                                             "(repeatable)."),
    lora_dir: Optional[Path] = typer.Option(None, help="Folder of LoRA adapters (.safetensors)."),
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    compile_buckets: CompileBucketsOpt = None,
    attention: AttentionOpt = "auto",
    quantize: QuantizeOpt = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate images; several prompts are batched step by step in one engine."""
    if (prompt is None) == (prompts_file is None):
        fail("give either a PROMPT or --prompts-file, not both and not neither")
    defaults = {"size": size, "seed": seed, "negative": negative, "steps": steps, "guidance": guidance,
                "sampler": sampler, "lora": [_lora_option(text) for text in lora or []]}
    try:
        entries = read_prompts_file(prompts_file) if prompts_file else [PromptFileEntry(prompt=prompt)]
        params = [_params(e, i, defaults) for i, e in enumerate(entries)]
        from glideserve.engine.engine import Engine

        if compile and not quiet:  # compiling takes tens of seconds: say what happens, bucket by bucket
            import logging

            logging.basicConfig(format="%(message)s")
            logging.getLogger("glideserve.engine.execution").setLevel(logging.INFO)

        engine = Engine.from_pretrained(model, single_file_config=config, allow_unsafe_pickle=allow_unsafe_pickle,
                                        max_batch_rows=max_batch_rows, max_waiting=max(len(params), 1),
                                        num_threads=threads, device=device, dtype=dtype, default_cache=cache,
                                        latent_aware=latent_aware,
                                        lora_dir=None if lora_dir is None else str(lora_dir),
                                        **execution_options(compile, compile_mode, compile_buckets, attention,
                                                            quantize))
        results = engine.generate(params, progress=not quiet)
    except GlideServeError as exc:
        fail(exc.message)
    except ValueError as exc:  # invalid engine options
        fail(str(exc))
    if prompts_file is None:
        path = output or Path("out.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        results[0].image.save(path)
        typer.echo(f"wrote {path} (seed {results[0].params.seed}, {results[0].timings.total_s:.2f} s)", err=True)
        return
    folder = output or Path("out")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, result in enumerate(results):
        name = f"{i:05d}.png"
        result.image.save(folder / name)
        p = result.params
        records.append({"index": i, "file": name, "prompt": p.prompt, "seed": p.seed, "steps": p.num_inference_steps,
                        "guidance": p.guidance_scale, "size": f"{p.width}x{p.height}", "sampler": p.sampler,
                        "cache": p.cache,
                        **result.timings.as_dict()})
    (folder / "timings.json").write_text(json.dumps(records, indent=1))
    typer.echo(f"wrote {len(results)} images and timings.json to {folder}", err=True)


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("generate")(generate)

