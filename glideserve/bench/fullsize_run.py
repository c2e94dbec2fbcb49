"""``glideserve bench fullsize``: SD3-medium or SDXL-base at full size (random weights, nothing downloaded),
diffusers' own pipeline against glideserve, in one run on one device.

The run, in order (see docs/gpu.md):

1. build the model from the public configs into a diffusers folder (:mod:`glideserve.bench.fullsize_models`),
   or reuse the one an earlier run built;
2. in this process (:mod:`glideserve.bench.fullsize_measure`): the matmul peak in the run's dtype, diffusers'
   pipeline latency and peak memory at batch 1 and 4, a bare denoiser forward at the same rows, FLOP counts;
   then the device is freed for the servers;
3. ``glideserve serve`` subprocesses, one after another: ``diffusers-sequential`` (the baseline and the SLO
   reference), glideserve with ``--cache none`` (equal quality; its engine step is probed at batch 1 and 4
   before the load) and glideserve with each cache policy; each gets its isolated latency and Poisson load
   at every rate (by default multiples of diffusers' batch-1 capacity);
4. ``fullsize.json`` and ``fullsize.md`` in the output folder, plus per-request CSVs and server logs.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from glideserve.bench.fullsize_models import check_family_scale, ensure_model, settings_for

BASELINE = "diffusers-sequential"
EXACT = "glideserve"  # the glideserve run at equal quality (--cache none); its engine step is probed
DEFAULT_POLICIES = {"sd3": ("adaptive", "glideserve:2", "fora:2"), "sdxl": ("deepcache:2",)}
DTYPES = ("float32", "float16", "bfloat16")
PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, high quality"


@dataclass(frozen=True)
class FullsizeOptions:
    """Everything one run needs; ``None`` fields take the family's or device's defaults.

    ``policies``: cache policies run after the exact one (``None``: the family's defaults; ``none``
    entries are dropped, the exact run is always there). ``rates`` (req/s) replace ``load_factors`` x
    diffusers' batch-1 capacity, each for ``duration_s`` (default 60 s; 5 s at tiny scale, a quick check).
    ``server_args`` go to every started server, ``glideserve_args`` (and
    ``--compile`` when ``compile``) only to glideserve's.
    """

    family: str = "sd3"
    scale: str = "full"
    device: str | None = None
    dtype: str | None = None
    policies: tuple[str, ...] | None = None
    steps: int | None = None
    size: int | None = None
    batches: tuple[int, ...] = (1, 4)
    pipe_repeats: int = 3
    step_rounds: int = 3
    load_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    rates: tuple[float, ...] = ()
    duration_s: float | None = None
    slo_scale: float = 4.0
    isolated: int = 3
    compile: bool = False
    server_args: tuple[str, ...] = ()
    glideserve_args: tuple[str, ...] = ()
    model_dir: Path | None = None
    rebuild: bool = False
    out: Path = Path("bench-results") / "fullsize"
    ready_timeout_s: float = 1800.0
    timeout_s: float = 600.0
    seed: int = 0


def resolve_device(requested: str | None, scale: str) -> str:
    """The torch device to run on: ``cuda`` when there is one; refuses ``--scale full`` on a machine
    without CUDA unless the CPU was asked for explicitly."""
    cuda = torch.cuda.is_available()
    if requested is None:
        if cuda:
            return "cuda"
        if scale == "full":
            raise ValueError("no CUDA device found: --scale full builds SD3-medium / SDXL at their real size "
                             "(billions of parameters) and is meant for a GPU. Run it on a GPU machine, pass "
                             "--scale tiny for a quick check of the command, or --device cpu to run the full "
                             "size on this CPU anyway (it takes hours)")
        return "cpu"
    if requested.startswith("cuda") and not cuda:
        raise ValueError(f"--device {requested}: torch {torch.__version__} sees no CUDA device; install a CUDA "
                         "build of torch on a GPU machine, or pass --device cpu")
    return requested


def resolve_dtype(requested: str | None, device: str) -> str:
    """``bfloat16`` on a GPU and ``float32`` on a CPU unless one of float32/float16/bfloat16 is given."""
    dtype = requested or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def resolve_policies(family: str, policies: tuple[str, ...] | None) -> tuple[str, ...]:
    """The cache policies to run, normalised, each checked against what the family implements."""
    from glideserve.cache.policy import parse_cache_policy
    from glideserve.runner.families.registry import family_class

    supported = family_class(family).cache_policies
    chosen = []
    for text in DEFAULT_POLICIES[family] if policies is None else policies:
        policy = parse_cache_policy(text, "--cache")
        if policy.kind not in supported:
            raise ValueError(f"--cache {text}: the {family} family implements {', '.join(supported)}")
        if policy.enabled and str(policy) not in chosen:
            chosen.append(str(policy))
    return tuple(chosen)


def _step_seconds(timing: dict) -> float:
    """One engine step of a request: its first step ends when ``denoise_s`` starts, and its last step's end
    also holds its VAE decode (``decode_s``), so ``steps - 1`` pure steps remain."""
    return (timing["denoise_s"] - timing["decode_s"]) / (timing["steps"] - 1)


async def probe_engine_steps(url: str, template, batch: int, rounds: int, timeout_s: float) -> list[float]:
    """Per-request engine step seconds of ``rounds`` bursts of ``batch`` requests sent together (after one
    warm-up burst), from the timings the server returns."""
    from glideserve.bench.loadgen import GENERATIONS_PATH, new_client

    samples = []
    async with new_client(timeout_s) as client:
        for r in range(rounds + 1):
            bodies = [template.body(PROMPT, 10_000 + r * batch + i, None) for i in range(batch)]
            answers = await asyncio.gather(*(client.post(url + GENERATIONS_PATH, json=b) for b in bodies))
            for answer in answers:
                if answer.status_code != 200:
                    raise RuntimeError(f"engine step probe: {url} answered {answer.status_code}: {answer.text[:300]}")
            if r:  # round 0 warms the server's kernels for this batch shape
                samples += [_step_seconds(a.json()["timings"]["images"][0]) for a in answers]
    return samples


def _targets(folder: str, options: FullsizeOptions, device: str, dtype: str, policies: tuple[str, ...]):
    from glideserve.bench.experiment import Target

    common = ("--device", device, "--dtype", dtype, *options.server_args)
    own = ("--profile-cache", str(options.out / "profiles.json"), *(("--compile",) if options.compile else ()),
           *options.glideserve_args)
    runs = [(BASELINE, BASELINE, common), (EXACT, "glideserve", common + own + ("--cache", "none"))]
    runs += [(f"glideserve+{p}", "glideserve", common + own + ("--cache", p)) for p in policies]
    return [Target(system, model=folder, server_args=args, ready_timeout_s=options.ready_timeout_s, label=label)
            for label, system, args in runs]


def _workloads(options: FullsizeOptions, capacity_rps: float, duration_s: float):
    from glideserve.bench.arrivals import make_schedule
    from glideserve.bench.experiment import Workload

    rates = options.rates or tuple(f * capacity_rps for f in options.load_factors)
    workloads = []
    for rate in rates:
        schedule = make_schedule("poisson", rate=rate, duration_s=duration_s, seed=options.seed)
        if not len(schedule):
            raise ValueError(f"Poisson arrivals at {rate:.3g} req/s over {duration_s:g} s drew no request; "
                             "raise --duration or the rates")
        workloads.append(Workload(f"rate-{rate:.3g}", schedule, rate))
    return workloads


def _derive(measured: dict, engine_steps: dict[int, list[float]]) -> tuple[list[dict], list[dict]]:
    """Pipeline rows with TFLOP/s and MFU; one row per batch pairing the bare forward with glideserve's step."""
    peak = measured["peak"]["flops"]
    pipeline = [{**row, "tflops": row["flops"] / row["latency_s"] / 1e12,
                 "mfu": row["flops"] / row["latency_s"] / peak} for row in measured["pipeline"]]
    steps = []
    for forward in measured["forward"]:
        row = {"batch": forward["batch"], "rows": forward["rows"], "flops": forward["flops"],
               "bare_forward_s": forward["seconds"], "bare_tflops": forward["flops"] / forward["seconds"] / 1e12,
               "bare_mfu": forward["flops"] / forward["seconds"] / peak}
        samples = engine_steps.get(forward["batch"])
        if samples:
            step = statistics.median(samples)
            row.update(glideserve_step_s=step, glideserve_step_samples=samples,
                       glideserve_tflops=forward["flops"] / step / 1e12, glideserve_mfu=forward["flops"] / step / peak,
                       overhead_pct=100.0 * (step / forward["seconds"] - 1.0))
        steps.append(row)
    return pipeline, steps


def _folder_name(label: str) -> str:
    return label.replace(":", "-").replace("+", "_")


def run(options: FullsizeOptions, log=print) -> dict:
    """Run the whole benchmark (see the module docstring); returns what ``fullsize.json`` holds and writes it
    and ``fullsize.md`` to ``options.out``. Raises ValueError / RuntimeError with what to change."""
    from glideserve.bench.experiment import SloPolicy, run_systems
    from glideserve.bench.fullsize_measure import measure_in_process
    from glideserve.bench.loadgen import RequestTemplate, toy_captions
    from glideserve.bench.records import write_records_csv
    from glideserve.bench.report import write_json
    from glideserve.models.loading import quiet_library_logging

    check_family_scale(options.family, options.scale)
    device = resolve_device(options.device, options.scale)
    dtype = resolve_dtype(options.dtype, device)
    policies = resolve_policies(options.family, options.policies)
    settings = settings_for(options.family, options.scale)
    steps, side = options.steps or settings.steps, options.size or settings.size
    if steps < 2:
        raise ValueError("--steps must be >= 2: the engine step is measured between a request's first and last step")
    if side % 64:
        raise ValueError(f"--size {side}: give a multiple of 64 (the VAE and patch grid divide it)")
    if not options.rates and not options.load_factors:
        raise ValueError("give --rates or --load-factors")
    if options.duration_s is not None and options.duration_s <= 0:
        raise ValueError(f"--duration {options.duration_s:g}: give the seconds of arrivals per rate, > 0")
    options.out.mkdir(parents=True, exist_ok=True)
    quiet_library_logging()
    folder = options.model_dir or (Path("bench-results") / "fullsize-models"
                                   / f"{options.family}-{options.scale}-{dtype}")
    torch_dtype = getattr(torch, dtype)
    model = ensure_model(folder, options.family, options.scale, device=device, dtype=torch_dtype, seed=options.seed,
                         rebuild=options.rebuild, log=log)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the build's blocks, before the measurements' peak memory

    measured = measure_in_process(str(folder), settings, device=device, dtype=torch_dtype, steps=steps, side=side,
                                  batches=options.batches, repeats=options.pipe_repeats, seed=options.seed,
                                  prompt=PROMPT, log=log)
    single = next((r for r in measured["pipeline"] if r["batch"] == 1), measured["pipeline"][0])
    capacity = single["images_per_s"] if single["batch"] == 1 else single["images_per_s"] / single["batch"]
    template = RequestTemplate(size=f"{side}x{side}", num_inference_steps=steps, guidance_scale=settings.guidance,
                               base_seed=options.seed)
    engine_steps: dict[int, list[float]] = {}

    def probe(target, url: str) -> None:
        if target.label != EXACT:
            return
        for batch in options.batches:
            engine_steps[batch] = asyncio.run(probe_engine_steps(url, template, batch, options.step_rounds,
                                                                 options.timeout_s))
            log(f"[{EXACT}] engine step at batch {batch}: {statistics.median(engine_steps[batch]) * 1000:.1f} ms")

    targets = _targets(str(folder), options, device, dtype, policies)
    duration_s = options.duration_s or (5.0 if options.scale == "tiny" else 60.0)
    workloads = _workloads(options, capacity, duration_s)
    log(f"serving: {', '.join(t.label for t in targets)}; Poisson at "
        f"{', '.join(f'{w.offered_rate:.3g}' for w in workloads)} req/s for {duration_s:g} s each")
    results = run_systems(targets, workloads, toy_captions(1000, options.seed), template,
                          slo=SloPolicy(slo_ms=None, slo_scale=options.slo_scale, isolated_requests=options.isolated),
                          timeout_s=options.timeout_s, log_dir=options.out / "logs",
                          flops_per_image=measured["image_flops"], peak_flops=measured["peak"]["flops"],
                          on_ready=probe, log=log)
    for label, runs in results.items():
        for r in runs:
            folder_out = options.out / _folder_name(label) / r.workload
            folder_out.mkdir(parents=True, exist_ok=True)
            write_records_csv(folder_out / "requests.csv", r.records)

    pipeline, step_rows = _derive(measured, engine_steps)
    target_args = {t.label: list(t.server_args) for t in targets}
    report = {
        "family": options.family, "scale": options.scale, "device": device, "device_name": _device_name(device),
        "dtype": dtype, "versions": _versions(),
        "model": {"dir": str(folder), **model, "total_parameters": sum(model["parameters"].values())},
        "settings": {"steps": steps, "size": f"{side}x{side}", "guidance": settings.guidance,
                     "max_sequence_length": settings.max_sequence_length, "prompt": PROMPT,
                     "compile": options.compile, "server_args": list(options.server_args),
                     "glideserve_args": list(options.glideserve_args)},
        "peak": measured["peak"],
        "flops_per_image": measured["image_flops"],
        "diffusers_pipeline": pipeline,
        "weights_memory_gib": measured["weights_memory_gib"],
        "denoiser_step": step_rows,
        "serving": {"capacity_rps": capacity, "rates": [w.offered_rate for w in workloads],
                    "duration_s": duration_s, "slo_scale": options.slo_scale,
                    "systems": {label: {"server_args": target_args[label],
                                        "isolated_latency_s": runs[0].summary.get("isolated_latency_s"),
                                        "runs": [r.summary for r in runs]}
                                for label, runs in results.items()}},
    }
    write_json(options.out / "fullsize.json", report)
    from glideserve.bench.fullsize_report import fullsize_markdown

    (options.out / "fullsize.md").write_text(fullsize_markdown(report))
    return report


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _versions() -> dict:
    import diffusers
    import transformers

    import glideserve

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "glideserve": getattr(glideserve, "__version__", None)}

