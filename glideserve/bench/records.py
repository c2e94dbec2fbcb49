"""One row per benchmark request: what was sent when, and how it ended."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

SUCCEEDED = "succeeded"
TIMED_OUT = "timed_out"
DROPPED = "dropped"
STATUSES = (SUCCEEDED, TIMED_OUT, DROPPED)


@dataclass
class RequestRecord:
    """The client's view of one request; times are seconds from the start of the run.

    ``status`` is ``succeeded`` (an image within the SLO), ``timed_out`` (an image after
    the SLO, or no answer before the client timeout) or ``dropped`` (the server refused
    the request, e.g. 429/503, or it failed). ``completed`` is true when an image came
    back, late or not. ``queued_s`` (the image's) and ``server_total_s`` (the request's) are copied
    from the timing block of the server's response when it has one.
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
    def send_lag_s(self) -> float | None:
        """How late the request left compared with its scheduled arrival."""
        return None if self.sent_s is None else self.sent_s - self.scheduled_s


_FIELDS = [f.name for f in dataclasses.fields(RequestRecord)]
_CSV_FIELDS = _FIELDS + ["latency_s"]


def write_records_csv(path: str | Path, records: list[RequestRecord]) -> None:
    """Write one CSV row per request (``latency_s`` is added for convenience)."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for rec in records:
            row = dataclasses.asdict(rec)
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
