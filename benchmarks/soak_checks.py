"""The soak test's bookkeeping: what the client saw, what the server counted, the server
process's resources, and the image check. Used by ``benchmarks/soak.py``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque

import numpy as np

READY_LINE = re.compile(r"^glideserve: serving .* at (http://\S+)")
STARTUP_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 200
REFERENCE_PROMPT = ("red", "circle", "blue")  # colour, shape, background of the image checked at both ends

# (route, status, code) of one HTTP answer, and the generation outcome it counts as (or None).
HttpKey = tuple[str, int, str]
Outcome = tuple[HttpKey, str | None]


class Tally:
    """What the client saw, thread-safe. ``exact`` outcomes are known to the client;
    ``ambiguous`` ones are a set of outcomes the server may have counted (a stream
    the client closed may have finished first). ``unexpected`` lists answers outside
    what a request class allows (including transport errors: an unanswered request)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.exact: Counter = Counter()
        self.ambiguous: list[tuple[Outcome, ...]] = []
        self.timeouts: Counter = Counter()
        self.unexpected: list[str] = []
        self.statuses: Counter = Counter()
        self.requests = 0
        self.completed_images = 0
        self.cancelled = 0
        self.max_steps_after_delete = 0

    def answer(self, what: str, route: str, status: int, code: str, generation: str | None,
               allowed: set[int], images: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.statuses[status] += 1
            self.exact[((route, status, code), generation)] += 1
            self.completed_images += images
            self.cancelled += generation == "cancelled"
            if status not in allowed:
                self.unexpected.append(f"{what}: {status} {code}")

    def either(self, options: tuple[Outcome, ...]) -> None:
        with self._lock:
            self.requests += 1
            self.cancelled += 1
            self.ambiguous.append(options)

    def unanswered(self, what: str, error: Exception) -> None:
        with self._lock:
            self.requests += 1
            self.unexpected.append(f"{what}: no answer ({error!r})")

    def timeout(self, kind: str, answered: Outcome | None = None) -> None:
        with self._lock:
            self.requests += 1
            self.timeouts[kind] += 1
            if answered is not None:
                self.exact[answered] += 1
                self.statuses[answered[0][1]] += 1

    def steps_after_delete(self, steps: int) -> None:
        with self._lock:
            self.max_steps_after_delete = max(self.max_steps_after_delete, steps)

    def summary(self) -> dict:
        return {"requests": self.requests, "completed_images": self.completed_images, "cancelled": self.cancelled,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "slow_clients_timed_out": dict(self.timeouts), "unexpected": len(self.unexpected),
                "max_steps_after_delete": self.max_steps_after_delete}


def _series(samples: dict, name: str) -> Counter:
    out: Counter = Counter()
    for (metric, labels), value in samples.items():
        if metric == name:
            out[labels] = value
    return out


def _match(kind: str, server: Counter, exact: Counter, ambiguous: list[tuple]) -> list[str]:
    """Mismatches between what the server counted and the client's exact and ambiguous tallies."""
    mismatches = []
    loose = {option for options in ambiguous for option in options}
    for key in set(server) | set(exact):
        if key not in loose and server[key] != exact[key]:
            mismatches.append(f"{kind} {key}: server counted {server[key]:g}, client saw {exact[key]}")
    extra = sum(server[key] - exact[key] for key in loose)
    if any(server[key] < exact[key] for key in loose) or extra != len(ambiguous):
        mismatches.append(f"{kind}: {len(ambiguous)} cancelled streams, the server counted {extra:g} "
                          f"among {sorted(loose)}")
    return mismatches


def reconcile(tally: Tally, before: dict, after: dict) -> dict:
    """Compare the server's /metrics increase with the client's tally."""
    def increase(name: str) -> Counter:
        start, end = _series(before, name), _series(after, name)
        return Counter({k: end[k] - start.get(k, 0.0) for k in end if end[k] - start.get(k, 0.0)})

    http = Counter()
    for labels, value in increase("glideserve_http_responses_total").items():
        fields = dict(labels)
        if fields["route"] not in ("/metrics", "/v1/stats"):  # the harness's own reads
            http[(fields["route"], int(fields["status"]), fields["code"])] = value
    generation = Counter({dict(k)["status"]: v for k, v in increase("glideserve_requests_total").items()})
    timeouts = Counter({dict(k)["kind"]: v for k, v in increase("glideserve_connection_timeouts_total").items()})
    client_http = Counter()
    client_generation = Counter()
    for (key, gen), count in tally.exact.items():
        client_http[key] += count
        if gen is not None:
            client_generation[gen] += count
    mismatches = _match("http", http, client_http, [tuple(o[0] for o in opts) for opts in tally.ambiguous])
    mismatches += _match("generation", generation, client_generation,
                         [tuple(o[1] for o in opts) for opts in tally.ambiguous])
    for kind in set(timeouts) | set(tally.timeouts):
        if timeouts[kind] != tally.timeouts[kind]:
            mismatches.append(f"{kind} timeouts: server counted {timeouts[kind]:g}, client caused "
                              f"{tally.timeouts[kind]}")
    return {"http_answers_counted": int(sum(http.values())), "generation_outcomes": dict(generation),
            "timeouts": dict(timeouts), "mismatches": mismatches}


class ProcessProbe:
    """RSS, open file descriptors and threads of the server process."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)

    def sample(self) -> dict:
        return {"rss_mb": round(self.process.memory_info().rss / 2**20, 1), "fds": self.process.num_fds(),
                "threads": self.process.num_threads()}


def compare_images(first: np.ndarray, last: np.ndarray) -> dict:
    from glideserve.toy.judge import judge_image

    mismatch = None
    if first.shape != last.shape:
        mismatch = f"shapes differ: {first.shape} vs {last.shape}"
    elif not np.array_equal(first, last):
        diff = np.abs(first.astype(np.int16) - last.astype(np.int16))
        mismatch = f"max difference {int(diff.max())} in {int((diff > 0).sum())} values"
    verdict = judge_image(last)
    color, shape, background = REFERENCE_PROMPT
    return {"mismatch": mismatch, "verdict": [verdict.color, verdict.shape, verdict.background],
            "judge_ok": all(verdict.matches(color, shape, background).values())}


class ServerProcess:
    """``glideserve serve`` on a free port. ``url`` is known once it reports ready;
    ``log_tail`` keeps its last lines of output for the report."""

    def __init__(self, model: str, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "glideserve", "serve", "--model", model,
                                      "--port", "0", "--log-level", "warning", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for line in self.proc.stdout:
            self.log_tail.append(line.rstrip("\n"))
            match = READY_LINE.match(line)
            if match:
                self.url = match.group(1)
                # Keep reading so a chatty server never blocks on a full pipe.
                threading.Thread(target=self._read_output, daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("the server did not report ready:\n" + "\n".join(self.log_tail))

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self.log_tail.append(line.rstrip("\n"))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 60 s)."""
        return stop_server(self.proc)


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit status (killed after 60 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=30)
