"""Soak and fault test: a mixed, hostile request stream against a live server process.

It starts ``glideserve serve`` with the bundled ``glide-tiny`` model and, for the
given time, sends from several threads: plain and streamed generations, streams
cancelled by disconnecting or by ``DELETE`` at a random step, plain requests
cancelled by ``DELETE``, bad inputs of every class the server refuses, bursts past
the queue bound, and slow clients (silent, half headers, half body). At the end it
checks that

- every request got exactly one answer, with a status expected for its class;
- ``/metrics`` counted what the client saw (HTTP answers by route/status/code,
  generation outcomes, header and body timeouts);
- a slow stream cancelled by DELETE on the idle server reports at most two more steps;
- the server is idle again, and its RSS, open file descriptors and threads are
  back within a bound of their values after the warm-up;
- an image generated at the end equals the one from the start (same seed) and the
  toy judge reads the prompt from it.

    python benchmarks/soak.py --minutes 10 --json soak.json

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from soak_checks import ProcessProbe, ServerProcess, Tally, compare_images, reconcile
from soak_clients import Clients

# Server settings: a small queue so bursts overflow it, short timeouts so slow clients
# resolve within the run. The client drops idle keep-alive connections well before the
# server does, so it never sends on a connection the server is closing.
SERVER_ARGS = ["--max-queue", "8", "--max-batch-rows", "16", "--header-timeout", "1", "--body-timeout", "1",
               "--keep-alive-timeout", "2", "--write-timeout", "5", "--max-connections", "64"]
CLIENT_KEEPALIVE_S = 1.0
WEIGHTS = {"plain": 30, "stream": 10, "stream_disconnect": 10, "stream_delete": 8, "plain_delete": 6,
           "bad_input": 25, "burst": 2, "slow_header": 3, "slow_body": 3, "silent": 2}
WORKERS = 6
CANCEL_PROBES = 3
RSS_GROWTH = 1.25  # end RSS may be at most this times the start, plus RSS_SLACK_MB
RSS_SLACK_MB = 48
FD_SLACK = 8
THREAD_SLACK = 4


def run_mix(clients: Clients, server: ServerProcess, seconds: float, seed: int) -> Counter:
    """Random actions from WORKERS threads for ``seconds`` (or until the server dies);
    returns how many of each ran."""
    deadline = time.monotonic() + seconds
    counts: Counter = Counter()
    lock = threading.Lock()
    names, weights = list(WEIGHTS), list(WEIGHTS.values())

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline and server.alive:
            action = rng.choices(names, weights)[0]
            try:
                getattr(clients, action)(rng)
            except (httpx.HTTPError, OSError) as exc:  # every action records its own; this is a bug guard
                clients.tally.unanswered(action, exc)
            with lock:
                counts[action] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


def wait_idle(url: str, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
        if stats["queue_depth"] == 0 and stats["running"] == 0 and stats["active_requests"] == 0:
            return True
        time.sleep(0.1)
    return False


def soak(minutes: float, seed: int, model: str) -> dict:
    server = ServerProcess(model, SERVER_ARGS)
    report: dict = {"minutes": minutes, "model": model, "server_args": SERVER_ARGS, "seed": seed, "failures": []}
    try:
        tally = Tally()
        clients = Clients(server.url, tally, keepalive_s=CLIENT_KEEPALIVE_S)
        probe = ProcessProbe(server.proc.pid)
        reference = clients.reference_image()
        total_s = minutes * 60.0
        warmup_s = min(30.0, max(3.0, 0.1 * total_s))
        before = clients.scrape()
        warm_counts = run_mix(clients, server, warmup_s, seed)
        if not wait_idle(server.url):
            report["failures"].append("the server did not go idle after the warm-up")
        clients.reset_pools()
        report["start"] = probe.sample()
        counts = run_mix(clients, server, total_s - warmup_s, seed + 1)
        report["actions"] = dict(counts + warm_counts)
        report.update(tally.summary())
        if not server.alive:
            raise RuntimeError(f"the server exited with {server.proc.returncode} during the run")
        idle = wait_idle(server.url)
        probe_rng = random.Random(seed)
        for _ in range(CANCEL_PROBES):
            clients.cancel_probe(probe_rng)
        idle = wait_idle(server.url) and idle
        clients.reset_pools()
        time.sleep(3.0)  # keep-alive connections and timers of the last requests expire
        report["end"] = probe.sample()
        after = clients.scrape()
        final = clients.reference_image()
        report.update(tally.summary())
        report["metrics"] = reconcile(tally, before, after)
        report["image"] = compare_images(reference, final)
        report["server_idle_at_end"] = idle
        report["failures"] += check(report, tally)
    except Exception as exc:  # reported with the server's last words rather than a bare traceback
        report["failures"].append(f"the soak stopped early: {exc!r}")
        report["server_log_tail"] = list(server.log_tail)
    finally:
        report["exit_code"] = server.stop()
    if report["exit_code"] != 0:
        report["failures"].append(f"the server exited with {report['exit_code']} after SIGTERM")
        report["server_log_tail"] = list(server.log_tail)
    report["ok"] = not report["failures"]
    return report


def check(report: dict, tally: Tally) -> list[str]:
    failures = list(tally.unexpected[:20])
    if len(tally.unexpected) > 20:
        failures.append(f"... and {len(tally.unexpected) - 20} more unexpected answers")
    failures += report["metrics"]["mismatches"]
    if not report["server_idle_at_end"]:
        failures.append("the server still had requests in flight after the stream stopped")
    if report["image"]["mismatch"]:
        failures.append(f"the final image differs from the first: {report['image']['mismatch']}")
    if not report["image"]["judge_ok"]:
        failures.append(f"the judge misreads the final image: {report['image']['verdict']}")
    start, end = report["start"], report["end"]
    if end["rss_mb"] > start["rss_mb"] * RSS_GROWTH + RSS_SLACK_MB:
        failures.append(f"RSS grew from {start['rss_mb']:.0f} MB to {end['rss_mb']:.0f} MB")
    if end["fds"] > start["fds"] + FD_SLACK:
        failures.append(f"open file descriptors grew from {start['fds']} to {end['fds']}")
    if end["threads"] > start["threads"] + THREAD_SLACK:
        failures.append(f"threads grew from {start['threads']} to {end['threads']}")
    if tally.max_steps_after_delete > 2:
        failures.append(f"a stream got {tally.max_steps_after_delete} steps after its DELETE (at most 2 allowed)")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (fractions allowed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random request mix")
    parser.add_argument("--model", default="glide-tiny", help="model to serve")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    report = soak(args.minutes, args.seed, args.model)
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
