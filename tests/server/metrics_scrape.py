"""Reading a server's /metrics as numbers, for tests that count what the server counted."""

from __future__ import annotations

import time

import httpx

Key = tuple[str, tuple[tuple[str, str], ...]]


def scrape(url: str, headers: dict | None = None) -> dict[Key, float]:
    """GET /metrics, parsed with prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def delta(before: dict[Key, float], after: dict[Key, float], name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def deltas(before: dict[Key, float], after: dict[Key, float], name: str,
           skip: dict[str, str] | None = None) -> dict[tuple, float]:
    """Every changed sample of ``name`` as ``{labels: increase}``, minus samples matching ``skip``."""
    out = {}
    for key in set(before) | set(after):
        if key[0] != name:
            continue
        labels = dict(key[1])
        if skip and all(labels.get(k) == v for k, v in skip.items()):
            continue
        change = after.get(key, 0.0) - before.get(key, 0.0)
        if change:
            out[key[1]] = change
    return out


def wait_for_metrics(url: str, condition, timeout_s: float = 30.0, headers: dict | None = None):
    """Scrape until ``condition(samples)`` holds (answers to closed clients are counted late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url, headers)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)
