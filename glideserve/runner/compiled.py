"""Regional ``torch.compile`` of a denoiser's repeated blocks, at a bounded set of batch sizes.

A block loop calls its blocks through a :class:`CompiledBlocks` instead of directly. It
pads the rows of every tensor argument up to the next *bucket* (a row count it
compiles for, by default powers of two up to the step's row budget), calls the block
compiled for that shape and slices the rows back, so the scheduler never sees the
buckets and the number of compiled graphs is known: buckets x compiled image sizes x
block variants (SD3's last block and FORA's recording pass differ from the others).

Compiles happen at warm-up only: :meth:`CompiledBlocks.freeze` closes the set of
shapes, and afterwards a call at an unseen shape (an image size that was not warmed
up, more rows than the largest bucket) runs the eager block instead of stalling the
engine for a compile. Padding repeats the last real row: rows of a block are
independent (attention mixes tokens within a row), so padded rows never change real
ones, and a repeated row keeps the numerics of real data (no all-zero rows).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two below ``max_rows``, and ``max_rows`` itself."""
    sizes, rows = [], 1
    while rows < max_rows:
        sizes.append(rows)
        rows *= 2
    return (*sizes, max_rows)


class BatchBuckets:
    """The row counts compiled blocks run at; ``bucket(rows)`` is the smallest that holds ``rows``."""

    def __init__(self, sizes: tuple[int, ...]):
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"compile buckets must be positive row counts, got {sizes!r}")
        self.sizes = tuple(sorted(set(sizes)))

    def bucket(self, rows: int) -> int | None:
        for size in self.sizes:
            if size >= rows:
                return size
        return None

    def __len__(self) -> int:
        return len(self.sizes)


@dataclass
class CompileStats:
    """What compilation cost: ``graphs`` compiled shapes and the seconds their first calls took
    (compile plus one run); ``warmup`` the seconds of each warm-up forward by label;
    ``padded_rows``/``rows`` count the rows run at compiled shapes (their ratio is the
    padding waste); ``eager_calls`` the block calls at uncompiled shapes."""

    graphs: int = 0
    compile_s: float = 0.0
    rows: int = 0
    padded_rows: int = 0
    eager_calls: int = 0
    shapes: list[str] = field(default_factory=list)
    warmup: dict[str, float] = field(default_factory=dict)


def _pad(value, rows: int, bucket: int):
    """``value`` with its leading ``rows`` dimension repeated up to ``bucket`` (tensors in tuples too)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows or bucket == rows:
            return value
        return torch.cat([value, value[-1:].expand(bucket - rows, *value.shape[1:])])
    if isinstance(value, tuple):
        return tuple(_pad(v, rows, bucket) for v in value)
    return value


def _unpad(value, rows: int, bucket: int):
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() and value.shape[0] == bucket and bucket != rows else value
    if isinstance(value, tuple):
        return tuple(_unpad(v, rows, bucket) for v in value)
    return value


def _signature(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape[1:]), value.dtype)
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    return (value,) if isinstance(value, (int, float, bool, str, type(None))) else (type(value).__name__,)


class CompiledBlocks:
    """Calls ``fn(block, *args, **kwargs)`` compiled per bucket and shape; see the module docstring.

    ``variant(block)`` names the structural kind of a block (blocks of one kind share
    compiled graphs, as regional compilation of repeated blocks does); the first
    tensor argument's leading dimension is the row count. Not thread-safe: the engine
    runs forwards on one thread.
    """

    def __init__(self, fn: Callable, buckets: BatchBuckets, variant: Callable[[torch.nn.Module], str],
                 mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.fn = fn
        self.buckets = buckets
        self.variant = variant
        self.stats = CompileStats()
        self.frozen = False
        self._seen: set[tuple] = set()
        self._warned: set[tuple] = set()
        options = {} if mode == "default" else {"mode": mode}
        self._compiled = torch.compile(fn, dynamic=False, **options)
        self._cuda_graphs = mode == "reduce-overhead"

    def begin_forward(self) -> None:
        """Call before each denoiser forward. With CUDA graphs (``reduce-overhead``) the graphs' outputs
        live in memory the next replay reuses; every output the loop keeps past a forward is a copy
        (cache entries are cloned, the head runs eager), so each forward may start a new generation."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def __call__(self, block, *args, **kwargs):
        rows = args[0].shape[0]
        bucket = self.buckets.bucket(rows)
        if bucket is None:
            self.stats.eager_calls += 1
            return self.fn(block, *args, **kwargs)
        key = (self.variant(block), bucket, _signature(args), _signature(tuple(kwargs.items())))
        first = key not in self._seen
        if first and self.frozen:
            self._warn_once(key, rows)
            self.stats.eager_calls += 1
            return self.fn(block, *args, **kwargs)
        args = tuple(_pad(a, rows, bucket) for a in args)
        kwargs = {k: _pad(v, rows, bucket) for k, v in kwargs.items()}
        start = time.perf_counter()
        out = self._compiled(block, *args, **kwargs)
        if first:
            self._seen.add(key)
            self.stats.graphs += 1
            self.stats.compile_s += time.perf_counter() - start
            self.stats.shapes.append(f"{key[0]}@{bucket}x{key[2][0][0]}")
        self.stats.rows += rows
        self.stats.padded_rows += bucket - rows
        return _unpad(out, rows, bucket)

    def freeze(self) -> None:
        """From now on, shapes not compiled yet run eager (no compile stalls while serving)."""
        self.frozen = True

    def _warn_once(self, key: tuple, rows: int) -> None:
        shape = key[2][0][0]
        if shape not in self._warned:
            self._warned.add(shape)
            log.warning("a %s block ran eager at input shape %s (not compiled at warm-up); add its image size to "
                        "the engine's compile sizes (--profile-size) to compile it", key[0], (rows, *shape))


def allow_recompiles(graphs: int) -> None:
    """Let dynamo keep ``graphs`` compiled entries per function (its default stops at 8 and falls back to
    eager silently); the count is bounded by the buckets and sizes the engine warms up."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, graphs)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * graphs)
