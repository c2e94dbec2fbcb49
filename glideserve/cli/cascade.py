"""``glideserve cascade ...`` (discriminator, profiles) and ``glideserve simulate`` (the cluster simulator)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import List, Optional

import typer

from glideserve.cascade import POLICIES
from glideserve.cli.errors import fail

BUNDLED_PROFILES = Path(__file__).resolve().parents[1] / "data" / "profiles"
BUNDLED_TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"


def resolve_trace(trace: str) -> Path:
    """A trace CSV path as given, or the bundled trace of that name when no such file exists."""
    path = Path(trace)
    if not path.is_file() and (BUNDLED_TRACES / trace).is_file():
        path = BUNDLED_TRACES / trace
    return path


def _threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def train_discriminator(
    light: str = typer.Option(..., "--light", help="The cascade's light model (bundled name or folder)."),
    out: Path = typer.Option(..., "--out", help="Folder to write discriminator.safetensors and .json to."),
    images: int = typer.Option(1200, "--images", min=10, help="Light-model images (and as many real ones); "
                               "a fifth of each is held out for the report."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Training steps (batches of 64)."),
    light_steps: Optional[int] = typer.Option(None, "--light-steps", min=1, help="Denoising steps of the light "
                                              "model (default: its own default, as the cascade serves it)."),
    kind: str = typer.Option("small-cnn", "--kind", help="small-cnn (trained from scratch) or encoder-head "
                             "(an MLP on a frozen local CLIP image encoder, --encoder)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="encoder-head: a local transformers CLIP "
                                           "vision folder."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
) -> None:
    """Train the discriminator of a cascade on the bundled compositional task: real scenes vs the light
    model's images, over every difficulty level; report accuracy, ROC-AUC and f(t) on held-out images."""
    from glideserve.cascade.training import train_for_light_model
    from glideserve.errors import GlideServeError

    _threads(threads)
    try:
        disc = train_for_light_model(light, images=images, steps=steps, seed=seed, kind=kind,
                                     encoder_path=None if encoder is None else str(encoder), light_steps=light_steps)
    except (GlideServeError, ValueError, FileNotFoundError) as exc:
        fail(getattr(exc, "message", str(exc)))
    disc.save(out)
    r = disc.report
    typer.echo(f"wrote {out}: held-out accuracy {r['accuracy']:.3f}, ROC-AUC {r['roc_auc']:.3f} "
               f"({r['held_out_images']} images; {r['generation_seconds']:.0f} s generating, "
               f"{r['training_seconds']:.0f} s training)")
    typer.echo("escalated share per level at threshold " + ", ".join(f"{t:g}" for t in (0.25, 0.5, 0.75)))
    for level, row in r["levels"].items():
        typer.echo(f"  {level:<7} mean confidence {row['mean_confidence']:.3f}  " +
                   "  ".join(f"{row[f'escalated@{t:g}']:.2f}" for t in (0.25, 0.5, 0.75)))


def measure_batch_latency(model: str, batches: list[int], repeats: int, steps: Optional[int]) -> list[float]:
    """Median seconds from submitting b requests at once to the last image, per batch size b."""
    from glideserve import Engine, GenerationParams

    engine = Engine.from_pretrained(model, max_batch_rows=2 * max(batches), max_waiting=max(batches))
    size = engine.spec.default_height
    engine.generate([GenerationParams(prompt="warm up", num_inference_steps=steps, seed=0, height=size, width=size)])
    out = []
    for b in batches:
        times = []
        for r in range(repeats):
            params = [GenerationParams(prompt=f"a red circle on a white background {i}", num_inference_steps=steps,
                                       seed=r * 100 + i, height=size, width=size) for i in range(b)]
            start = time.perf_counter()
            engine.generate(params)
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times))
    return out


def profile_cascade(
    light: str = typer.Option(..., "--light"),
    heavy: str = typer.Option(..., "--heavy"),
    discriminator: Path = typer.Option(..., "--discriminator", help="Trained discriminator folder (its f(t))."),
    slo_s: float = typer.Option(..., "--slo-s", min=0.001, help="The cascade's latency SLO in seconds."),
    out: Path = typer.Option(..., "--out", help="Profiles JSON to write (DiffServe's schema)."),
    batch: List[int] = typer.Option([1, 2, 4, 8], "--batch", help="Batch sizes to measure (repeatable)."),
    repeats: int = typer.Option(3, "--repeats", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
) -> None:
    """Measure per-batch latency of both models on this machine and write a profiles file the allocator
    and ``glideserve simulate`` read."""
    from glideserve.cascade import discriminator as disc_mod

    _threads(threads)
    batches = sorted(set(batch))
    if not batches or batches[0] < 1:
        fail("--batch sizes must be positive")
    try:
        report = disc_mod.load(discriminator).report
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    latency = {}
    for model in (light, heavy):
        typer.echo(f"measuring {model} at batch sizes {batches} ...", err=True)
        latency[model] = [round(1000 * s, 2) for s in measure_batch_latency(model, batches, repeats, None)]
    profiles = {"source": "glideserve cascade profile on this machine; latency in ms of one batch of requests "
                          "submitted together, at each model's default steps",
                "batch_sizes": batches, "latency_ms": latency,
                "escalated_fraction_at_threshold": {light: report["escalated_fraction_at_threshold"]},
                "slo_s": {f"{light}_{heavy}": slo_s}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profiles, indent=2) + "\n")
    for model, values in latency.items():
        typer.echo(f"{model}: " + ", ".join(f"b={b} {ms:.0f} ms" for b, ms in zip(batches, values)))
    typer.echo(f"wrote {out}")


def simulate(
    trace: str = typer.Option("maf_trace_4to32qps.csv", "--trace", help="Trace CSV (arrival_ms,prompt_id): a "
                              "path, or the name of a bundled trace."),
    workers: int = typer.Option(16, "--workers", min=1),
    profiles: Path = typer.Option(BUNDLED_PROFILES / "diffserve_a100.json", "--profiles",
                                  help="Profiles JSON (default: DiffServe's A100 profiles)."),
    light: str = typer.Option("sd-turbo-1step", "--light"),
    heavy: str = typer.Option("sd1.5-50step", "--heavy"),
    cascade: Optional[str] = typer.Option("sdturbo", "--cascade", help="Name of the f(t) table (default for "
                                          "DiffServe's: sdturbo; the light model's name in ours)."),
    slo_s: Optional[float] = typer.Option(None, "--slo-s", min=0.001, help="SLO (default: the file's)."),
    policy: List[str] = typer.Option(list(POLICIES), "--policy", help="Policies to run (repeatable)."),
    static_threshold: float = typer.Option(0.1, "--static-threshold", min=0.0, max=1.0),
    interval_s: float = typer.Option(5.0, "--interval-s", min=0.1, help="Re-planning interval."),
    seed: int = typer.Option(0, "--seed"),
    shared_machine: bool = typer.Option(False, "--shared-machine", help="One machine whose step time both "
                                        "models share, as `glideserve serve --cascade` runs (--workers 1)."),
    admission: bool = typer.Option(False, "--admission", help="Also glideserve's admission rule: refuse a query "
                                   "predicted late, and answer with the light image an escalation the heavy "
                                   "model would finish late (default: DiffServe's workers, which only drop)."),
    rate: Optional[float] = typer.Option(None, "--rate", min=0.001, help="Fit the whole trace into --duration "
                                         "at this mean rate (as `glideserve bench cascade` does)."),
    duration: Optional[float] = typer.Option(None, "--duration", min=1.0),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for results.json and plots."),
) -> None:
    """Simulate a cascade on N workers under a trace: SLO violations, drops and quality per policy."""
    from glideserve.bench.arrivals import make_schedule
    from glideserve.cascade.profiles import load_profiles
    from glideserve.cascade.simulator import SimulationConfig
    from glideserve.cascade.simulator import simulate as run

    path = resolve_trace(trace)
    try:
        if (rate is None) != (duration is None):
            raise ValueError("give --rate and --duration together (or neither, for the trace as it is)")
        schedule = make_schedule("trace", rate=rate, duration_s=duration, trace=path, seed=seed)
        profile = load_profiles(profiles, light, heavy, cascade, slo_s)
        configs = [SimulationConfig(workers, p, interval_s=interval_s, static_threshold=static_threshold, seed=seed,
                                    shared_machine=shared_machine, admission=admission) for p in policy]
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"{path.name}: {len(schedule)} queries over {schedule.span_s:.0f} s ({schedule.mean_rate:.1f}/s); "
               f"{workers} workers; {light} -> {heavy}; SLO {profile.slo_s:g} s")
    typer.echo(f"{'policy':<10} {'violations':>10} {'late':>6} {'dropped':>8} {'heavy share':>11}  quality")
    results = []
    for config in configs:
        result = run(profile, schedule.offsets, config)
        results.append(result)
        quality = ", ".join(f"{k} {v:.3f}" for k, v in result.quality.items() if k != "heavy_share")
        typer.echo(f"{config.policy:<10} {result.violation_ratio:>10.4f} {result.late:>6} {result.dropped:>8} "
                   f"{result.quality['heavy_share']:>11.3f}  {quality}")
    if out is not None:
        from glideserve.cascade.plots import plot_simulation

        out.mkdir(parents=True, exist_ok=True)
        meta = {"trace": path.name, "workers": workers, "light": light, "heavy": heavy, "slo_s": profile.slo_s,
                "static_threshold": static_threshold, "interval_s": interval_s}
        (out / "results.json").write_text(json.dumps({**meta, "results": [r.as_dict() for r in results]}) + "\n")
        plot_simulation(results, out / "simulation.png", title=f"{path.name}, {workers} workers",
                        escalation=profile.escalation)
        typer.echo(f"wrote {out / 'results.json'} and {out / 'simulation.png'}")


def _policy_timelines(result, escalation=None) -> dict[str, dict[str, list[float]]]:
    """Per policy and second: arrivals, violations and, from the polled metrics, threshold and light share
    (with ``escalation``, f, also the planned escalated share)."""
    seconds = int(result.config.duration_s) + 1
    timelines = {}
    for policy, entry in result.policies.items():
        timeline = dict(entry["timeline"])
        fixed = {"all-light": (0.0, 1.0), "all-heavy": (1.0, 0.0)}.get(policy)
        threshold, share, demand = [0.0] * seconds, [0.0] * seconds, [0.0] * seconds
        last = (fixed or (result.config.static_threshold, 0.5)) + (0.0,)
        samples = iter(entry["samples"])
        sample = next(samples, None)
        for s in range(seconds):
            while sample is not None and sample["t"] <= s + 1:
                light = sample.get(f"share:{result.config.light}")
                heavy = sample.get(f"share:{result.config.heavy}")
                last = (sample.get("threshold", last[0]),
                        light / (light + heavy) if light is not None and heavy else last[1],
                        sample.get("demand", last[2]))
                sample = next(samples, None)
            threshold[s], share[s], demand[s] = fixed + (0.0,) if fixed else last
        timelines[policy] = {**timeline, "threshold": threshold, "light_workers": share, "demand": demand}
        if escalation is not None:
            timelines[policy]["escalated_plan"] = [escalation(t) for t in threshold]
    return timelines


def _escalation(bench):
    """f(t) of the benchmark's discriminator (the light model's bundled one by default)."""
    from glideserve.cascade import discriminator as disc_mod
    from glideserve.cascade.profiles import EscalationProfile
    from glideserve.cascade.serving import default_discriminator

    folder = bench.discriminator or default_discriminator(bench.light)
    return EscalationProfile.from_table(disc_mod.load(folder).report["escalated_fraction_at_threshold"])


def cascade_report(result) -> str:
    """Markdown: one row per policy (overall), then judge and escalation per difficulty level."""
    d = result.as_dict()
    lines = [f"# Cascade benchmark: {d['light']} -> {d['heavy']}", "",
             f"{d['requests']} requests over {d['duration_s']:g} s ({d['trace']} shape, offered {d['offered_per_s']:.2f}/s "
             f"= {result.config.overload:g} x {d['heavy']}'s capacity of {d['heavy_capacity_per_s']:.2f}/s); SLO "
             f"{d['slo_s']:.2f} s = {result.config.slo_scale:g} x its isolated latency of {d['heavy_isolated_s']:.2f} s; "
             f"static threshold {d['static_threshold']:g}.", "",
             "| policy | SLO violations | judge all-correct | correct and on time | goodput (img/s) | toy CLIP | "
             "toy FID | served by |", "|---|---|---|---|---|---|---|---|"]
    for policy, entry in d["policies"].items():
        o = entry["levels"]["overall"]
        served = ", ".join(f"{k} {v}" for k, v in sorted(o["served_by"].items()))
        lines.append(f"| {policy} | {o['violation_ratio']:.3f} | {o['judge_all_correct']:.3f} | "
                     f"{o['correct_on_time']:.3f} | {o['goodput_per_s']:.3f} | {o.get('toy_clip_score', float('nan')):.3f} | "
                     f"{o.get('toy_fid', float('nan')):.2f} | {served} |")
    lines += ["", "Per difficulty level: judge all-correct of served images / correct and on time / escalated share",
              "", "| policy | easy | medium | hard |", "|---|---|---|---|"]
    for policy, entry in d["policies"].items():
        cells = []
        for level in ("easy", "medium", "hard"):
            row = entry["levels"].get(level)
            if row is None:
                cells.append("-")
                continue
            esc = "-" if row["escalated"] is None else f"{row['escalated']:.2f}"
            cells.append(f"{row['judge_all_correct']:.2f} / {row['correct_on_time']:.2f} / {esc}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench_cascade(
    light: str = typer.Option("glide-turbo", "--light"),
    heavy: str = typer.Option("glide-base", "--heavy"),
    discriminator: Optional[Path] = typer.Option(None, "--discriminator", help="Default: the light model's "
                                                 "bundled discriminator."),
    trace: str = typer.Option("maf_trace_4to32qps.csv", "--trace", help="Trace whose shape the load follows."),
    overload: float = typer.Option(2.0, "--overload", min=0.01, help="Offered load / the heavy model's capacity."),
    slo_scale: float = typer.Option(5.0, "--slo-scale", min=0.01, help="SLO / the heavy model's isolated latency."),
    duration: float = typer.Option(120.0, "--duration", min=1.0, help="Seconds of arrivals per policy."),
    static_threshold: float = typer.Option(0.5, "--static-threshold", min=0.0, max=1.0),
    policy: List[str] = typer.Option(list(POLICIES), "--policy", help="Policies to run (repeatable)."),
    per_level: int = typer.Option(40, "--per-level", min=1, help="Captions per difficulty level to draw from."),
    interval: float = typer.Option(5.0, "--interval-s", min=0.1, help="The MILP's re-planning interval."),
    seed: int = typer.Option(0, "--seed"),
    toy_clip: bool = typer.Option(True, "--toy-clip/--no-toy-clip", help="Also the toy CLIP score and FID."),
    out: Path = typer.Option(Path("bench-results/cascade"), "--out"),
) -> None:
    """All-light, all-heavy, static and MILP cascades under one overloading trace: SLO violations, judge
    accuracy per difficulty, toy CLIP/FID and goodput counting only on-time correct images."""
    from glideserve.bench.cascade_run import CascadeBench, run_cascade_bench
    from glideserve.cascade.plots import plot_timelines

    path = resolve_trace(trace)
    try:
        bench = CascadeBench(light, heavy, None if discriminator is None else str(discriminator), static_threshold,
                             str(path), overload, slo_scale, duration, per_level, tuple(policy), interval, seed)
        clip = None
        if toy_clip:
            from glideserve.toy.contrastive import load_toy_clip

            clip = load_toy_clip()
        result = run_cascade_bench(bench, out, log=typer.echo, toy_clip=clip)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    report = cascade_report(result)
    (out / "report.md").write_text(report)
    plot_timelines(_policy_timelines(result, _escalation(bench)), out / "timeline.png",
                   title=f"{light} -> {heavy}, {path.name} shape")
    typer.echo(report)
    typer.echo(f"results in {out}")


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    cascade_app = typer.Typer(no_args_is_help=True, help="Model cascades: discriminator training and profiles.")
    app.add_typer(cascade_app, name="cascade")
    cascade_app.command("train-discriminator")(train_discriminator)
    cascade_app.command("profile")(profile_cascade)
    app.command("simulate")(simulate)
    bench_app.command("cascade")(bench_cascade)
