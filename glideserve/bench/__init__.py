"""Benchmarks: open-loop load generation, summary metrics, reports, plots and baseline backends."""
