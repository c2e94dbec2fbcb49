"""Latency profiles at start-up: reuse a cached one or measure it, and persist it as JSON.

The cache is one small JSON file (``--profile-cache``; default
``$XDG_CACHE_HOME/glideserve/profiles.json`` or ``~/.cache/glideserve/profiles.json``)
mapping a key to a profile. The key names everything that changes the timings: the
model (its name and a fingerprint of its weight files), the image size, dtype,
device, torch's thread count, the batch budget and the torch version. A stale or
unreadable file is reported and replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from glideserve.config import EngineConfig
from glideserve.engine.startup import StartupProgress
from glideserve.models.loading import resolve_model_path
from glideserve.models.spec import ModelSpec
from glideserve.runner.profiler import measure_size
from glideserve.runner.runner import ModelRunner
from glideserve.scheduler.profile import LatencyProfile

log = logging.getLogger(__name__)


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glideserve" / "profiles.json"


def model_fingerprint(model: str) -> str:
    """A short hash of the model's weight files (names, sizes, modification times)."""
    path = resolve_model_path(model)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                  and p.suffix in (".safetensors", ".json", ".bin", ".ckpt"))
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def profile_key(model: str, height: int, width: int, config: EngineConfig) -> str:
    sched = config.scheduler
    return (f"{Path(model).name}@{model_fingerprint(model)}|{width}x{height}|{config.dtype}|{config.device}"
            f"|threads={torch.get_num_threads()}|rows={sched.max_batch_rows}|tokens={sched.max_latent_tokens}"
            f"|decode={sched.max_decode_batch}|torch={torch.__version__}{_execution_key(config)}")


def _execution_key(config: EngineConfig) -> str:
    """Compiled, quantised or kernel-pinned steps take other times than eager ones."""
    key = ""
    if config.compile:
        key += f"|compile={config.compile_mode}:{','.join(map(str, config.compile_buckets)) or 'pow2'}"
    if config.quantize:
        key += f"|quantize={config.quantize}"
    if config.attention != "auto":
        key += f"|attention={config.attention}"
    return key


class ProfileCache:
    """The JSON file of profiles; ``get``/``put`` by key, ``save`` writes atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._entries = data
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable latency profile cache %s (%s); it will be rewritten", path, exc)

    def get(self, key: str) -> LatencyProfile | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            return LatencyProfile.from_json(entry["profile"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a stale or malformed latency profile entry in %s (%s); measuring anew", self.path, exc)
            return None

    def put(self, key: str, profile: LatencyProfile) -> None:
        self._entries[key] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile": profile.to_json()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._entries, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def profiling_progress(model_name: str, startup: StartupProgress | None = None) -> Callable[[str], None]:
    """``load_or_measure``'s progress callback: the log, and ``startup``'s stage when given."""
    if startup is not None:
        startup.begin("profiling the latency of", model_name)

    def progress(message: str) -> None:
        log.info("profiling %s", message)
        if startup is not None:
            startup.note(message)

    return progress


def load_or_measure(model: str, runner: ModelRunner, spec: ModelSpec, config: EngineConfig,
                    progress: Callable[[str], None] | None = None, refresh: bool = False) -> LatencyProfile:
    """The profile for every size in ``config.profile_sizes`` (default: the model's default
    size), from the cache where it has them, measured (and cached) otherwise."""
    progress = progress or (lambda message: log.info("profiling %s", message))
    sizes = config.profile_sizes or ((spec.default_height, spec.default_width),)
    cache = ProfileCache(Path(config.profile_cache) if config.profile_cache else default_cache_path())
    profile = LatencyProfile()
    measured = False
    for height, width in sizes:
        key = profile_key(model, height, width, config)
        cached = None if refresh else cache.get(key)
        if cached is None:
            start = time.perf_counter()
            cached = measure_size(runner, spec, height, width, config.scheduler, progress=progress)
            progress(f"{width}x{height}: measured in {time.perf_counter() - start:.1f} s")
            cache.put(key, cached)
            measured = True
        else:
            progress(f"{width}x{height}: loaded from {cache.path}")
        profile.merge(cached)
    if measured:
        try:
            cache.save()
        except OSError as exc:
            log.warning("could not write the latency profile cache %s (%s); the profile is used but not kept",
                        cache.path, exc)
    return profile
