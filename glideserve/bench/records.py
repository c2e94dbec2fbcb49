"""One row per benchmark request: what was sent when, and how it ended."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

ON_TIME = "on_time"
LATE = "late"
REFUSED = "refused"
DROPPED = "dropped"
STATUSES = (ON_TIME, LATE, REFUSED, DROPPED)
# Error codes of answers that turn a request away before any work: the client may retry
# elsewhere at once. Every other error (a 503 ``deadline_exceeded`` after admission, a
# 5xx, a broken connection) counts as dropped.
REFUSAL_CODES = frozenset({"slo_unattainable", "queue_full", "shutting_down", "too_many_connections"})


@dataclass
class RequestRecord:
    """The client's view of one request; times are seconds from the start of the run.

    ``status`` is the outcome: ``on_time`` (an image within the SLO), ``late`` (an image
    after the SLO, or no answer before the client timeout), ``refused`` (turned away
    before any work: any 429, or an error whose code is in ``REFUSAL_CODES``) or
    ``dropped`` (admitted and then failed: 503 ``deadline_exceeded``, a 5xx, a broken
    connection). ``error_code`` is the ``error.code`` of an error answer.
    ``completed`` is true when an image came back, late or not. ``queued_s`` (the
    image's) and ``server_total_s`` (the request's) are copied from the timing block of
    the server's response when it has one. ``workload_class`` names the request's class
    in a mixed workload (e.g. ``20 steps 64x64``), empty otherwise. ``prompt``, ``seed``,
    ``steps`` (None: the server's default) and ``size`` (empty: the default) say what
    was asked; ``full_steps`` and
    ``cached_steps`` are copied from the image's timings. With image scoring on,
    ``image`` holds the returned PNG (never written to CSV), ``judge_correct`` the toy
    judge's verdict and ``ssim`` the SSIM against the exact engine's image. ``served_by`` is the model
    that made the image and ``escalated`` (cascades only) whether the light model's answer was sent on.
    """

    index: int
    prompt_id: int
    scheduled_s: float
    status: str
    sent_s: float | None = None
    finished_s: float | None = None
    completed: bool = False
    http_status: int | None = None
    slo_s: float | None = None
    queued_s: float | None = None
    server_total_s: float | None = None
    error: str = ""
    error_code: str = ""
    workload_class: str = ""
    prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    size: str = ""
    full_steps: int | None = None
    cached_steps: int | None = None
    judge_correct: bool | None = None
    ssim: float | None = None
    served_by: str = ""
    escalated: bool | None = None
    image: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def latency_s(self) -> float | None:
        """Client-measured seconds from send to the complete response (completed requests only)."""
        if not self.completed or self.sent_s is None or self.finished_s is None:
            return None
        return self.finished_s - self.sent_s

    @property
    def answer_s(self) -> float | None:
        """Seconds from send to any answer (an image or an error); None without one."""
        if self.sent_s is None or self.finished_s is None:
            return None
        return self.finished_s - self.sent_s

    @property
    def send_lag_s(self) -> float | None:
        """How late the request left compared with its scheduled arrival."""
        return None if self.sent_s is None else self.sent_s - self.scheduled_s


_FIELDS = [f.name for f in dataclasses.fields(RequestRecord) if f.name != "image"]
_CSV_FIELDS = _FIELDS + ["latency_s"]


def write_records_csv(path: str | Path, records: list[RequestRecord]) -> None:
    """Write one CSV row per request (``latency_s`` is added for convenience)."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for rec in records:
            row = {name: getattr(rec, name) for name in _FIELDS}
            row["latency_s"] = rec.latency_s
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_records_csv(path: str | Path) -> list[RequestRecord]:
    """Read records written by :func:`write_records_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(RequestRecord)}
    records = []
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            values = {}
            for name in _FIELDS:
                raw = row[name]
                kind = types[name]
                if raw == "" and "None" in kind:
                    values[name] = None
                elif kind.startswith("bool"):
                    values[name] = raw == "True"
                elif kind.startswith("int"):
                    values[name] = int(raw)
                elif kind.startswith("float"):
                    values[name] = float(raw)
                elif kind == "bool":
                    values[name] = raw == "True"
                else:
                    values[name] = raw
            records.append(RequestRecord(**values))
    return records
