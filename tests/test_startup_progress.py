"""StartupProgress: the stage, the count and the sentence /ready shows while a server loads."""

from __future__ import annotations

from glideserve.engine.profiling import profiling_progress
from glideserve.engine.startup import StartupProgress


def test_progress_counts_the_stage_units_and_describes_them():
    now = [100.0]
    progress = StartupProgress(clock=lambda: now[0])
    assert progress.snapshot()["stage"] == "starting" and progress.snapshot()["done"] is None
    progress.begin("loading", "glide-small")
    now[0] = 103.0
    assert progress.describe() == "loading glide-small; 3 s since start-up"
    progress.begin("compiling the blocks of", "glide-small", total=6, unit="bucket shapes")
    assert progress.snapshot()["done"] == 0
    progress.advance(2, "last: 2 rows at 64x64 in 9.1 s")
    now[0] = 141.4
    snap = progress.snapshot()
    assert (snap["done"], snap["total"], snap["elapsed_s"]) == (2, 6, 41.4)
    assert progress.describe() == ("compiling the blocks of glide-small: 2 of 6 bucket shapes "
                                   "(last: 2 rows at 64x64 in 9.1 s); 41 s since start-up")
    progress.begin("profiling the latency of", "glide-small")
    progress.note("64x64: measured in 0.4 s")
    snap = progress.snapshot()
    assert snap["done"] is None and snap["total"] is None and snap["unit"] == ""
    assert snap["detail"] == "64x64: measured in 0.4 s"


def test_profiling_progress_enters_its_stage_and_notes_each_size():
    progress = StartupProgress()
    report = profiling_progress("glide-tiny", progress)
    assert progress.snapshot()["stage"] == "profiling the latency of"
    report("64x64: measured in 0.4 s")
    assert progress.describe().startswith("profiling the latency of glide-tiny (64x64: measured in 0.4 s)")
    profiling_progress("glide-tiny")("64x64: loaded from the cache")  # without a StartupProgress: the log only
