"""``glideserve bench``: open-loop load, rate sweeps and latency tables against image servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from glideserve.errors import GlideServeError

SystemOpt = Annotated[Optional[list[str]], typer.Option(
    "--system", help="System to benchmark (repeat for a side-by-side table). With --model the benchmark starts "
                     "`glideserve serve --system NAME`; 'LABEL=NAME ARGS...' runs it under LABEL with extra serve "
                     "arguments, e.g. 'fcfs=glideserve --policy fcfs'. With --url it is only a label.")]
UrlOpt = Annotated[Optional[list[str]], typer.Option(
    "--url", help="Base URL of a running server (repeat, in the order of --system). Omit to start servers.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model each started server loads (name or path).")]
ServerArgOpt = Annotated[Optional[list[str]], typer.Option(
    "--server-arg", help="Extra argument for started servers, e.g. --server-arg=--max-batch-rows=8 (repeatable).")]
PromptsOpt = Annotated[Optional[Path], typer.Option(
    help="Text file with one prompt per line; default: toy captions 'a {color} {shape} on a {background} background'.")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="num_inference_steps (default: the server's).")]
GuidanceOpt = Annotated[Optional[float], typer.Option(help="guidance_scale (default: the server's).")]
SizeOpt = Annotated[Optional[str], typer.Option(help="Image size WIDTHxHEIGHT (default: the server's).")]
StepsMixOpt = Annotated[Optional[str], typer.Option(
    help="Mixed workload: comma-separated step counts, e.g. 10,20,40; each request draws one (seeded). "
         "Each class gets its own isolated latency and SLO.")]
SizeMixOpt = Annotated[Optional[str], typer.Option(
    help="Mixed workload: comma-separated sizes, e.g. 64x64,128x128; each request draws one (seeded).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of request 0; request i uses seed + i. Also seeds arrivals.")]
SloMsOpt = Annotated[Optional[float], typer.Option(help="Per-request SLO in ms (overrides --slo-scale).")]
SloScaleOpt = Annotated[float, typer.Option(
    help="SLO = this x the isolated latency (requests one at a time) of the first --system, shared by all.")]
IsolatedOpt = Annotated[int, typer.Option(help="Requests sent one at a time to measure the isolated latency.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout-s", help="Client deadline per request, seconds.")]
FlopsOpt = Annotated[Optional[float], typer.Option(
    help="Model FLOPs per image, for achieved FLOP/s and MFU (default: what the server reports, if anything).")]
CountFlopsOpt = Annotated[bool, typer.Option(
    "--count-flops/--no-count-flops",
    help="With --model and no --flops-per-image: count the model's FLOPs per image by running it once here.")]
PeakOpt = Annotated[bool, typer.Option("--peak/--no-peak", help="Measure the fp32 matmul peak for MFU.")]
OutOpt = Annotated[Optional[Path], typer.Option(help="Output folder (default: bench-results/<command>-<time>).")]
ReadyOpt = Annotated[float, typer.Option(help="Seconds to wait for a started server's /ready.")]
ArrivalOpt = Annotated[str, typer.Option(help="Arrival process: poisson, constant, bursts or trace.")]
RateOpt = Annotated[Optional[float], typer.Option(help="Requests per second (a trace is rescaled to it).")]
DurationOpt = Annotated[Optional[float], typer.Option(help="Seconds of arrivals (with --rate, a whole trace is fitted into it and thinned to the rate).")]
CountOpt = Annotated[Optional[int], typer.Option(help="Number of requests (poisson / constant).")]
TraceOpt = Annotated[Optional[Path], typer.Option(help="Trace CSV of arrival_ms,prompt_id lines.")]


_USER_ERRORS = (GlideServeError, ValueError, FileNotFoundError, RuntimeError)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def parse_system(text: str) -> tuple[str, str, tuple[str, ...]]:
    """``(label, system, extra serve args)`` from ``NAME`` or ``LABEL=NAME ARGS...`` (shell-quoted)."""
    import shlex

    label, sep, rest = text.partition("=")
    if not sep:
        return text, text, ()
    words = shlex.split(rest)
    if not label.strip() or not words:
        raise ValueError(f"--system {text!r}: write LABEL=SYSTEM [ARGS...], e.g. 'fcfs=glideserve --policy fcfs'")
    return label.strip(), words[0], tuple(words[1:])


def _targets(systems, urls, model, server_args, ready_timeout):
    from glideserve.bench.experiment import Target

    systems, urls = list(systems or []), list(urls or [])
    if urls:
        if model:
            raise ValueError("give either --url (servers already running) or --model (start them), not both")
        systems = systems or [f"server{i + 1}" if len(urls) > 1 else "server" for i in range(len(urls))]
        if len(systems) != len(urls):
            raise ValueError(f"{len(urls)} --url but {len(systems)} --system labels: give one label per URL")
        return [Target(s, url=u) for s, u in zip(systems, urls)]
    if not model:
        raise ValueError("give --url of a running server, or --model (with --system) to start servers")
    if not systems:
        raise ValueError("give at least one --system to start, e.g. --system glideserve --system diffusers-sequential")
    targets = []
    for text in systems:
        label, name, extra = parse_system(text)
        targets.append(Target(name, model=model, server_args=tuple(server_args or ()) + extra,
                              ready_timeout_s=ready_timeout, label=label))
    return targets


def _mix(text: str | None, kind, what: str) -> tuple:
    if not text:
        return ()
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = tuple(kind(item) for item in items)
    except ValueError:
        raise ValueError(f"--{what}-mix {text!r}: give a comma-separated list") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"--{what}-mix {text!r}: give distinct values, comma-separated")
    return values


def _steps(item: str) -> int:
    value = int(item)
    if value < 1:
        raise ValueError(item)
    return value


def _size(item: str) -> str:
    from glideserve.params import parse_size

    parse_size(item)  # the server's grammar; raises InvalidRequestError on a bad size
    return item


def _common(prompts, steps, guidance, size, seed, slo_ms, slo_scale, isolated, steps_mix=None, size_mix=None):
    from glideserve.bench.experiment import SloPolicy
    from glideserve.bench.loadgen import RequestTemplate, read_prompts, toy_captions

    prompt_list = read_prompts(prompts) if prompts else toy_captions(1000, seed)
    template = RequestTemplate(size=size, num_inference_steps=steps, guidance_scale=guidance,
                               base_seed=seed, steps_mix=_mix(steps_mix, _steps, "steps"),
                               size_mix=_mix(size_mix, _size, "size"))
    return prompt_list, template, SloPolicy(slo_ms=slo_ms, slo_scale=slo_scale, isolated_requests=isolated)


def _offered_rate(arrival: str, schedule, rate, duration, burst_size, burst_interval) -> float | None:
    """The rate a workload offers: nominal for synthetic processes, realised for a (cut) trace."""
    if arrival == "bursts":
        return burst_size / burst_interval
    if arrival == "trace":
        window = duration or schedule.span_s
        return len(schedule) / window if window else None
    return rate


def _out_dir(out: Path | None, command: str) -> Path:
    out = out or Path("bench-results") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _flops(given: float | None, count: bool, model: str | None, template) -> float | None:
    if given is not None or not count or model is None:
        return given
    if template.steps_mix or template.size_mix:
        typer.echo("FLOPs per image vary across a mixed workload's classes: FLOP/s and MFU are not counted")
        return None
    from glideserve.bench.flops import count_flops_per_image

    flops = count_flops_per_image(model, num_inference_steps=template.num_inference_steps,
                                  guidance_scale=template.guidance_scale, size=template.size)
    typer.echo(f"model FLOPs per image: {flops / 1e9:.2f} GFLOP")
    return flops


def _peak(enabled: bool) -> float | None:
    if not enabled:
        return None
    from glideserve.bench.metrics import measure_matmul_peak_flops

    peak = measure_matmul_peak_flops()
    typer.echo(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    return peak


def _run_all(targets, workloads, prompts, template, slo, timeout_s, out, flops, peak, keep_images=False, model=None):
    from glideserve.bench.experiment import run_systems
    from glideserve.bench.records import write_records_csv

    results = run_systems(targets, workloads, prompts, template, slo=slo, timeout_s=timeout_s, log_dir=out,
                          flops_per_image=flops, peak_flops=peak, keep_images=keep_images, log=typer.echo)
    if keep_images:  # after every server has stopped: the reference engine has the CPU to itself
        from glideserve.bench.served_quality import ExactReferences, quality_figures, score_served_images

        typer.echo("scoring served images against the exact engine ...")
        references = ExactReferences(model)
        for runs in results.values():
            for run in runs:
                score_served_images(run.records, references)
                run.summary["quality"] = quality_figures(run.records, run.summary["wall_s"])
    for system, runs in results.items():
        for run in runs:
            folder = out / system / run.workload if len(workloads) > 1 else out / system
            folder.mkdir(parents=True, exist_ok=True)
            write_records_csv(folder / "requests.csv", run.records)
    return results


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        values = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.5,1,2") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{option} {text!r}: give positive numbers, comma-separated")
    return values


def register(app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``bench load``, ``bench sweep``, ``bench latency``, ``bench peak`` and ``bench fullsize``."""

    @bench_app.command("load")
    def load(system: SystemOpt = None, url: UrlOpt = None, model: ModelOpt = None, server_arg: ServerArgOpt = None,
             arrival: ArrivalOpt = "poisson", rate: RateOpt = None, duration: DurationOpt = None,
             num_requests: CountOpt = None, burst_size: Annotated[Optional[int], typer.Option()] = None,
             burst_interval: Annotated[Optional[float], typer.Option(help="Seconds between bursts.")] = None,
             num_bursts: Annotated[Optional[int], typer.Option()] = None, trace: TraceOpt = None,
             prompts: PromptsOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None, size: SizeOpt = None,
             steps_mix: StepsMixOpt = None, size_mix: SizeMixOpt = None,
             seed: SeedOpt = 0, slo_ms: SloMsOpt = None, slo_scale: SloScaleOpt = 4.0, isolated: IsolatedOpt = 3,
             timeout_s: TimeoutOpt = 300.0, flops_per_image: FlopsOpt = None, count_flops: CountFlopsOpt = True,
             peak: PeakOpt = True, out: OutOpt = None, ready_timeout: ReadyOpt = 600.0,
             score_images: Annotated[bool, typer.Option(
                 help="Keep every returned image; after the run, read toy captions with the judge and compare "
                      "each image with the exact engine's (SSIM). Needs --model.")] = False) -> None:
        """Open-loop load on one or more systems; writes per-request CSVs, summary.json, report.md and plots."""
        from glideserve.bench import plots
        from glideserve.bench.arrivals import make_schedule
        from glideserve.bench.experiment import Workload
        from glideserve.bench.report import load_markdown, write_json

        try:
            targets = _targets(system, url, model, server_arg, ready_timeout)
            schedule = make_schedule(arrival, rate=rate, duration_s=duration, count=num_requests,
                                     burst_size=burst_size, burst_interval_s=burst_interval, num_bursts=num_bursts,
                                     trace=trace, seed=seed)
            if not len(schedule):
                raise ValueError("the arrival schedule is empty; raise --duration or --rate")
            prompt_list, template, slo = _common(prompts, steps, guidance, size, seed, slo_ms, slo_scale, isolated,
                                                 steps_mix, size_mix)
            out_dir = _out_dir(out, "load")
            offered = _offered_rate(arrival, schedule, rate, duration, burst_size, burst_interval)
            flops = _flops(flops_per_image, count_flops, model, template)
            if score_images and model is None:
                raise ValueError("--score-images needs --model: the exact engine makes the reference images")
            results = _run_all(targets, [Workload(arrival, schedule, offered)], prompt_list, template, slo,
                               timeout_s, out_dir, flops, _peak(peak), keep_images=score_images, model=model)
        except _USER_ERRORS as exc:
            _fail(exc)
        summaries = {name: runs[0].summary for name, runs in results.items()}
        write_json(out_dir / "summary.json", summaries)
        text = load_markdown(summaries, title=f"{arrival} load, {len(schedule)} requests")
        (out_dir / "report.md").write_text(text)
        plots.plot_latency_cdf({n: runs[0].records for n, runs in results.items()}, out_dir / "latency_cdf.png")
        plots.plot_outcomes_over_time({n: s["per_second"] for n, s in summaries.items()}, out_dir / "outcomes.png")
        typer.echo(text)
        typer.echo(f"results in {out_dir}")

    @bench_app.command("sweep")
    def sweep(rates: Annotated[str, typer.Option(help="Comma-separated offered rates (req/s), e.g. 0.5,1,2.")],
              system: SystemOpt = None, url: UrlOpt = None, model: ModelOpt = None, server_arg: ServerArgOpt = None,
              arrival: ArrivalOpt = "poisson", duration: DurationOpt = 60.0, trace: TraceOpt = None,
              prompts: PromptsOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None, size: SizeOpt = None,
              steps_mix: StepsMixOpt = None, size_mix: SizeMixOpt = None,
              seed: SeedOpt = 0, slo_ms: SloMsOpt = None, slo_scale: SloScaleOpt = 4.0, isolated: IsolatedOpt = 3,
              timeout_s: TimeoutOpt = 300.0, flops_per_image: FlopsOpt = None, count_flops: CountFlopsOpt = True,
              peak: PeakOpt = True, out: OutOpt = None, ready_timeout: ReadyOpt = 600.0) -> None:
        """Load at several offered rates per system; writes sweep.json, sweep.md and sweep.png."""
        from glideserve.bench import plots
        from glideserve.bench.arrivals import make_schedule
        from glideserve.bench.experiment import Workload
        from glideserve.bench.report import sweep_markdown, write_json

        try:
            rate_list = [float(r) for r in rates.split(",") if r.strip()]
            if not rate_list:
                raise ValueError("--rates needs at least one rate")
            if arrival == "bursts":
                raise ValueError("a sweep varies the rate: use poisson, constant or trace arrivals")
            targets = _targets(system, url, model, server_arg, ready_timeout)
            workloads = []
            for r in rate_list:
                schedule = make_schedule(arrival, rate=r, duration_s=duration, trace=trace, seed=seed)
                workloads.append(Workload(f"rate-{r:g}", schedule,
                                          _offered_rate(arrival, schedule, r, duration, None, None)))
            prompt_list, template, slo = _common(prompts, steps, guidance, size, seed, slo_ms, slo_scale, isolated,
                                                 steps_mix, size_mix)
            out_dir = _out_dir(out, "sweep")
            flops = _flops(flops_per_image, count_flops, model, template)
            results = _run_all(targets, workloads, prompt_list, template, slo, timeout_s, out_dir, flops, _peak(peak))
        except _USER_ERRORS as exc:
            _fail(exc)
        sweeps = {name: [run.summary for run in runs] for name, runs in results.items()}
        write_json(out_dir / "sweep.json", sweeps)
        text = sweep_markdown(sweeps)
        (out_dir / "sweep.md").write_text(text)
        plots.plot_sweep(sweeps, out_dir / "sweep.png")
        typer.echo(text)
        typer.echo(f"results in {out_dir}")

    @bench_app.command("latency")
    def latency(system: SystemOpt = None, url: UrlOpt = None, model: ModelOpt = None, server_arg: ServerArgOpt = None,
                single_count: Annotated[int, typer.Option(help="Requests of the single-request run (0: skip).")] = 20,
                interval: Annotated[float, typer.Option(help="Seconds between single requests.")] = 1.0,
                batch_count: Annotated[int, typer.Option(help="Requests sent at once (0: skip).")] = 24,
                prompts: PromptsOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
                size: SizeOpt = None, seed: SeedOpt = 0, timeout_s: TimeoutOpt = 600.0, out: OutOpt = None,
                ready_timeout: ReadyOpt = 600.0) -> None:
        """Single-request and batched latency tables (total, queueing, inference) per system."""
        from glideserve.bench.experiment import SloPolicy
        from glideserve.bench.latency import add_inference_times, latency_workloads
        from glideserve.bench.report import latency_markdown, write_json

        try:
            targets = _targets(system, url, model, server_arg, ready_timeout)
            workloads = latency_workloads(single_count, interval, batch_count)
            prompt_list, template, _ = _common(prompts, steps, guidance, size, seed, None, None, 1)
            out_dir = _out_dir(out, "latency")
            results = _run_all(targets, workloads, prompt_list, template,
                               SloPolicy(slo_ms=None, slo_scale=None, isolated_requests=0), timeout_s, out_dir,
                               None, None)
        except _USER_ERRORS as exc:
            _fail(exc)
        tables = {name: {run.workload: add_inference_times(run.summary, run.records) for run in runs}
                  for name, runs in results.items()}
        write_json(out_dir / "latency.json", tables)
        text = latency_markdown(tables)
        (out_dir / "latency.md").write_text(text)
        typer.echo(text)
        typer.echo(f"results in {out_dir}")

    @bench_app.command("peak")
    def peak_cmd(size: Annotated[int, typer.Option(help="Matrix side.")] = 1024,
                 seconds: Annotated[float, typer.Option(help="Seconds of timed matmuls.")] = 2.0) -> None:
        """Measure this machine's fp32 matmul peak (the MFU denominator)."""
        from glideserve.bench.metrics import measure_matmul_peak_flops

        typer.echo(f"{measure_matmul_peak_flops(size, seconds) / 1e9:.1f} GFLOP/s fp32 ({size}x{size} matmul)")

    @bench_app.command("fullsize")
    def fullsize(
            family: Annotated[str, typer.Option(help="sd3 (SD3-medium) or sdxl (SDXL base).")] = "sd3",
            scale: Annotated[str, typer.Option(help="full: the published sizes, for a GPU; tiny: the same families "
                                                    "cut down, a quick CPU check of the command.")] = "full",
            device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda; the CPU only at "
                                                               "--scale tiny or when named).")] = None,
            dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: bfloat16 on "
                                                              "a GPU, float32 on a CPU).")] = None,
            cache: Annotated[Optional[list[str]], typer.Option(
                "--cache", help="glideserve cache policy run after the exact (--cache none) one; repeat for several "
                                "(default: adaptive, glideserve:2, fora:2 for sd3; deepcache:2 for sdxl; "
                                "--cache none: the exact run only).")] = None,
            steps: Annotated[Optional[int], typer.Option(
                "--steps", help="num_inference_steps (default: 28 for sd3, 30 for sdxl).")] = None,
            size: Annotated[Optional[int], typer.Option(
                help="Square image side (default 1024; 64 at tiny scale).")] = None,
            load_factors: Annotated[str, typer.Option(help="Poisson rates as multiples of diffusers' batch-1 "
                                                           "capacity (1 / its latency).")] = "0.5,1,2",
            rates: Annotated[Optional[str], typer.Option(
                help="Poisson rates in req/s (replace --load-factors).")] = None,
            duration: Annotated[Optional[float], typer.Option(help="Seconds of arrivals per rate (default 60; "
                                                                   "5 at tiny scale).")] = None,
            slo_scale: Annotated[float, typer.Option(
                help="SLO = this x diffusers-sequential's isolated latency, shared by all systems.")] = 4.0,
            isolated: IsolatedOpt = 3,
            pipe_repeats: Annotated[int, typer.Option(min=1, help="Timed diffusers pipeline calls per batch.")] = 3,
            compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                                  help="Start glideserve's servers with --compile.")] = False,
            server_arg: ServerArgOpt = None,
            glideserve_arg: Annotated[Optional[list[str]], typer.Option(
                "--glideserve-arg", help="Extra argument for glideserve's servers only, e.g. "
                                         "--glideserve-arg=--attention=flash (repeatable).")] = None,
            model_dir: Annotated[Optional[Path], typer.Option(help="Where the built model is kept and reused "
                                                                   "(default: bench-results/fullsize-models/"
                                                                   "FAMILY-SCALE-DTYPE).")] = None,
            rebuild: Annotated[bool, typer.Option(help="Build the model again even if --model-dir holds it.")] = False,
            seed: SeedOpt = 0, timeout_s: TimeoutOpt = 600.0, out: OutOpt = None,
            ready_timeout: ReadyOpt = 1800.0) -> None:
        """SD3-medium or SDXL at full size with random weights (nothing downloaded): diffusers' pipeline against
        glideserve, MFU and engine overhead, in one run; writes fullsize.json and fullsize.md (docs/gpu.md)."""
        from glideserve.bench.fullsize_run import FullsizeOptions, run

        try:
            options = FullsizeOptions(
                family=family, scale=scale, device=device, dtype=dtype,
                policies=None if cache is None else tuple(cache),
                steps=steps, size=size, pipe_repeats=pipe_repeats, load_factors=_floats(load_factors, "--load-factors"),
                rates=_floats(rates, "--rates"), duration_s=duration, slo_scale=slo_scale, isolated=isolated,
                compile=compile, server_args=tuple(server_arg or ()), glideserve_args=tuple(glideserve_arg or ()),
                model_dir=model_dir, rebuild=rebuild, ready_timeout_s=ready_timeout, timeout_s=timeout_s, seed=seed,
                # created by the run once the options are checked: a refused run leaves no empty folder
                out=out or Path("bench-results") / f"fullsize-{time.strftime('%Y%m%d-%H%M%S')}")
            run(options, log=typer.echo)
        except _USER_ERRORS as exc:
            _fail(exc)
        typer.echo((options.out / "fullsize.md").read_text())
        typer.echo(f"results in {options.out}")
