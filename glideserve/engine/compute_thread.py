"""ComputeThread: the one OS thread on which a backend loads, profiles and runs its model.

Why one thread for a backend's whole life: PyTorch's CPU kernels run in OpenMP parallel
regions, and GNU libgomp keeps a pool of worker threads per thread that opens regions.
Once a second pool exists (say the model was loaded and profiled on the main thread and
is then stepped on a worker), the process holds more OpenMP threads than cores, libgomp
stops spinning between regions and every small kernel pays a futex wake. On a 2-core
machine that made an elementwise add 7 us -> 47 us and a glide-small step 8.4 ms ->
15.9 ms, and it made the latency profile (measured on the first thread) a third too
optimistic for the steps that followed. Keeping every tensor operation of a backend on
one thread avoids both.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread that runs submitted callables one at a time, in submission order.

    ``submit`` returns a Future; ``call`` waits for the result (re-raising the callable's
    exception). A long-running callable (an engine loop) holds the thread until it
    returns. ``close`` lets the queued work finish, then ends the thread; being a daemon,
    the thread never keeps a crashing process alive.
    """

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def starting_with(cls, name: str, fn: Callable[..., T], *args, **kwargs) -> "tuple[ComputeThread, T]":
        """A new thread that has already run ``fn`` (a model load); closed again if ``fn`` raises."""
        compute = cls(name)
        try:
            return compute, compute.call(fn, *args, **kwargs)
        except BaseException:
            compute.close()
            raise

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
        if self._closed:
            raise RuntimeError(f"compute thread {self.name!r} is closed")
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if threading.current_thread() is self._thread:  # a job calling back in must not wait on itself
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def close(self, timeout: float | None = None) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)
