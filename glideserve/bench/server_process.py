"""Start the server under test as a subprocess, wait until it is ready, read its CPU time, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

READY_PATH = "/ready"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_command(system: str, model: str, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    """``glideserve serve --system S --model M --port P`` run with this interpreter."""
    return [sys.executable, "-m", "glideserve", "serve",
            "--system", system, "--model", model, "--port", str(port), *extra_args]


class ServerProcess:
    """A ``glideserve serve`` subprocess on 127.0.0.1, owned by the benchmark.

    ``start`` launches it and returns once ``GET /ready`` answers 200 (or raises
    RuntimeError with the end of its log if it exits or is not ready in time);
    ``cpu_seconds`` is the user+system CPU time of the process and its children so
    far; ``stop`` sends SIGTERM, waits for a graceful exit and kills it only if that
    does not come. Use it as a context manager to always stop it.
    """

    def __init__(self, system: str, model: str, *, log_path: str | Path, port: int | None = None,
                 extra_args: tuple[str, ...] = (), ready_timeout_s: float = 600.0):
        self.system = system
        self.model = model
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self._popen: subprocess.Popen | None = None
        self._process: psutil.Process | None = None

    def start(self) -> "ServerProcess":
        if self._popen is not None:  # a second start would orphan the first server, still running
            raise RuntimeError("this server was started already; use either start() or `with`, not both")
        command = serve_command(self.system, self.model, self.port, self.extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self._process = psutil.Process(self._popen.pid)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise RuntimeError(f"`glideserve serve --system {self.system}` exited with code "
                                   f"{self._popen.returncode} before it was ready; its log ends with:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + READY_PATH, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"`glideserve serve --system {self.system}` was not ready after {self.ready_timeout_s:g} s "
                           f"(raise --ready-timeout for large models); its log ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User+system CPU seconds of the server and all its (live or reaped) children."""
        if self._process is None:
            raise RuntimeError("the server has not been started")
        times = self._process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in self._process.children(recursive=True):
            try:
                child_times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += child_times.user + child_times.system
        return total

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
        if self._popen is None or self._popen.poll() is not None:
            return None if self._popen is None else self._popen.returncode
        self._popen.send_signal(signal.SIGTERM)
        try:
            return self._popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            return self._popen.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
