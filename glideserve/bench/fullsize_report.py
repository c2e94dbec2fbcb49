"""The Markdown report of ``glideserve bench fullsize`` (the tables docs/gpu.md explains)."""

from __future__ import annotations

from glideserve.bench.report import fmt, markdown_table, sweep_markdown

PIPELINE_COLUMNS = ["batch", "latency (s)", "images/s", "peak memory (GiB)", "FLOP/s", "MFU"]
STEP_COLUMNS = ["batch (rows)", "bare forward (ms)", "bare FLOP/s", "bare MFU", "glideserve step (ms)",
                "glideserve FLOP/s", "glideserve MFU", "engine overhead"]


def si(value: float | None, unit: str = "") -> str:
    """``312.4 T``, ``5.21 G``: three significant digits with an SI prefix (tiny and full runs share columns)."""
    if value is None:
        return "n/a"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()
ISOLATED_COLUMNS = ["system", "server arguments", "isolated latency (s)"]


def _signed_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def fullsize_markdown(report: dict) -> str:
    """Headline facts, then diffusers' pipeline, the denoising step, isolated latencies and the load sweep."""
    model, settings, peak = report["model"], report["settings"], report["peak"]
    name = {"sd3": "SD3-medium", "sdxl": "SDXL base"}[report["family"]]
    lines = [
        f"# {name} ({report['scale']} scale, random weights) on {report['device_name']} ({report['device']}, "
        f"{report['dtype']})",
        "",
        f"- model: {model['total_parameters'] / 1e9:.3f} B parameters ("
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in model["parameters"].items()) + ")",
        f"- requests: {settings['size']}, {settings['steps']} steps, guidance {settings['guidance']:g} "
        f"(classifier-free guidance: 2 denoiser rows per image)"
        + (f", T5 length {settings['max_sequence_length']}" if settings["max_sequence_length"] else ""),
        f"- matmul peak (measured, {peak['dtype']}, {peak['matmul_size']}x{peak['matmul_size']}): "
        f"{si(peak['flops'], 'FLOP/s')}; FLOPs per image: {si(report['flops_per_image'], 'FLOP')}",
        f"- glideserve: compile {'on' if settings['compile'] else 'off'}; extra server arguments: "
        f"{' '.join(settings['server_args'] + settings['glideserve_args']) or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "## diffusers pipeline (`pipe(prompt, num_images_per_prompt=batch)`)",
        "",
        "",
    ]
    rows = [[str(r["batch"]), fmt(r["latency_s"], 3), fmt(r["images_per_s"], 3), fmt(r.get("peak_memory_gib"), 2),
             si(r["tflops"] * 1e12), fmt(r["mfu"], 1, percent=True)] for r in report["diffusers_pipeline"]]
    text = "\n".join(lines) + markdown_table(PIPELINE_COLUMNS, rows)
    if report["weights_memory_gib"] is not None:
        text += f"\nWeights resident on the device: {report['weights_memory_gib']:.2f} GiB.\n"
    text += "\n## Denoising step (one forward of the denoiser, CFG rows)\n\n"
    rows = [[f"{r['batch']} ({r['rows']})", fmt(r["bare_forward_s"], 1, 1000), si(r["bare_tflops"] * 1e12),
             fmt(r["bare_mfu"], 1, percent=True), fmt(r.get("glideserve_step_s"), 1, 1000),
             si(r["glideserve_tflops"] * 1e12) if "glideserve_tflops" in r else "n/a",
             fmt(r.get("glideserve_mfu"), 1, percent=True),
             _signed_percent(r.get("overhead_pct"))] for r in report["denoiser_step"]]
    text += markdown_table(STEP_COLUMNS, rows)
    text += ("\nMFU = denoiser FLOPs per step / step time / the matmul peak above. Engine overhead = glideserve's "
             "step (server timings, `--cache none`) / the bare forward at the same rows - 1.\n")
    serving = report["serving"]
    text += (f"\n## Serving: isolated latency and Poisson load\n\nRates: "
             f"{', '.join(fmt(r, 3) for r in serving['rates'])} req/s, {serving['duration_s']:g} s each "
             f"(diffusers' batch-1 capacity: {serving['capacity_rps']:.3f} req/s). SLO = {serving['slo_scale']:g} x "
             f"the isolated latency of {next(iter(serving['systems']))}.\n\n")
    rows = [[label, f"`{' '.join(s['server_args'])}`", fmt(s["isolated_latency_s"], 3)]
            for label, s in serving["systems"].items()]
    text += markdown_table(ISOLATED_COLUMNS, rows) + "\n"
    text += sweep_markdown({label: s["runs"] for label, s in serving["systems"].items()})
    text += ("\nMFU in the load table counts the exact model's FLOPs per image; with a cache policy, cached steps "
             "skip part of them, so there it is an effective figure (throughput in exact-model FLOPs).\n")
    return text
