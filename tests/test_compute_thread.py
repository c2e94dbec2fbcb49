"""ComputeThread: one thread, submission order, errors handed back, clean close."""

import threading

import pytest

from glideserve.engine.compute_thread import ComputeThread


def test_jobs_run_in_order_on_one_named_daemon_thread():
    compute = ComputeThread("glideserve-test")
    seen = []
    futures = [compute.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
    for f in futures:
        f.result(timeout=5)
    assert [i for i, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {"glideserve-test"}
    assert compute._thread.daemon
    compute.close(timeout=5)
    assert not compute._thread.is_alive()


def test_call_returns_the_result_and_reraises_the_error():
    compute = ComputeThread("glideserve-test")
    assert compute.call(lambda a, b: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad"):
        compute.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert compute.call(lambda: compute.call(lambda: 7)) == 7  # a job calling back in does not deadlock
    compute.close(timeout=5)


def test_a_closed_thread_refuses_new_work_after_finishing_the_queue():
    compute = ComputeThread("glideserve-test")
    gate = threading.Event()
    first = compute.submit(gate.wait, 5)
    second = compute.submit(lambda: "done")
    gate.set()
    compute.close(timeout=5)
    assert first.result() is True and second.result() == "done"
    with pytest.raises(RuntimeError, match="closed"):
        compute.submit(lambda: None)
