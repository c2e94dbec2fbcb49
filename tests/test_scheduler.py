"""Scheduler tests with a fake runner: no model, no tensors."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from glideserve.config import SchedulerConfig
from glideserve.errors import InvalidRequestError, QueueFullError
from glideserve.outputs import GenerationResult, Queued, RequestFailed, StepProgress
from glideserve.params import GenerationParams
from glideserve.request import Request, RequestStatus
from glideserve.scheduler.output import RunnerOutput, SchedulerOutput
from glideserve.scheduler.scheduler import Scheduler


class FakeRunner:
    """Counts steps per request like the real runner and 'decodes' on the last one."""

    def __init__(self):
        self.states: dict[str, list[int]] = {}  # id -> [steps_done, num_steps]
        self.plans: list[SchedulerOutput] = []

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.plans.append(plan)
        out = RunnerOutput()
        for rid in plan.freed:
            self.states.pop(rid, None)
        for data in plan.new_requests:
            assert data.request_id not in self.states
            self.states[data.request_id] = [0, data.params.num_inference_steps]
        for rid in plan.scheduled:
            state = self.states[rid]
            state[0] += 1
            out.stepped.append(rid)
            if state[0] == state[1]:
                del self.states[rid]
                out.finished[rid] = (Image.new("RGB", (1, 1)), 0.0)
        return out


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def make_request(rid: str, steps: int = 3, cfg: bool = True, tokens: int = 16, size: int = 32) -> Request:
    params = GenerationParams("p", num_inference_steps=steps, guidance_scale=5.0 if cfg else 1.0, seed=0,
                              height=size, width=size, sampler="x")
    return Request(rid, params, num_steps=steps, rows=2 if cfg else 1, tokens_per_row=tokens, arrival_time=0.0)


def run_step(sched: Scheduler, runner: FakeRunner):
    plan = sched.schedule()
    return plan, sched.update(plan, runner.execute(plan))


def test_requests_join_and_leave_at_every_step():
    sched, runner = Scheduler(SchedulerConfig(max_batch_rows=64), clock=Clock()), FakeRunner()
    sched.add_request(make_request("a", steps=3))
    plan, _ = run_step(sched, runner)
    assert plan.scheduled == ("a",) and [d.request_id for d in plan.new_requests] == ["a"]
    sched.add_request(make_request("b", steps=2))  # joins while "a" is mid-way
    plan, _ = run_step(sched, runner)
    assert plan.scheduled == ("a", "b") and [d.request_id for d in plan.new_requests] == ["b"]
    plan, events = run_step(sched, runner)  # both take their last step now
    assert plan.scheduled == ("a", "b") and not plan.new_requests
    assert {e.request_id for e in events if isinstance(e, GenerationResult)} == {"a", "b"}
    sched.add_request(make_request("c", steps=1))
    plan, _ = run_step(sched, runner)
    assert plan.scheduled == ("c",)  # finished requests left at once
    assert not sched.has_unfinished()


def test_progress_events_count_every_step_and_timings():
    sched, runner = Scheduler(SchedulerConfig(), clock=Clock()), FakeRunner()
    sched.add_request(make_request("a", steps=4))
    events = []
    while sched.has_unfinished():
        events += run_step(sched, runner)[1]
    steps = [e.step for e in events if isinstance(e, StepProgress)]
    assert steps == [1, 2, 3, 4]
    result = [e for e in events if isinstance(e, GenerationResult)][0]
    assert result.timings.steps == 4 and result.timings.total_s >= result.timings.denoise_s > 0


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_respected_on_random_workloads(seed):
    rng = random.Random(seed)
    config = SchedulerConfig(max_batch_rows=7, max_latent_tokens=200, max_waiting=1000)
    sched, runner = Scheduler(config, clock=Clock()), FakeRunner()
    finished, added = set(), 0
    for step in range(300):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if added < 80:
                sched.add_request(make_request(f"r{added}", steps=rng.randint(1, 9), cfg=rng.random() < 0.6,
                                               tokens=rng.choice([16, 32, 64])))
                added += 1
        plan, events = run_step(sched, runner)
        assert plan.num_rows <= config.max_batch_rows and plan.num_tokens <= config.max_latent_tokens
        assert len(set(plan.scheduled)) == len(plan.scheduled)
        finished |= {e.request_id for e in events if isinstance(e, GenerationResult)}
    assert len(finished) == added == 80 and not sched.has_unfinished()


def test_abort_frees_the_slot_at_the_next_step():
    sched, runner = Scheduler(SchedulerConfig(max_batch_rows=2), clock=Clock()), FakeRunner()
    sched.add_request(make_request("a", steps=10))
    sched.add_request(make_request("b", steps=2))
    plan, events = run_step(sched, runner)
    assert plan.scheduled == ("a",)  # b waits: the budget holds one CFG request
    assert any(isinstance(e, Queued) and e.request_id == "b" and e.position == 0 for e in events)
    assert sched.abort("a")
    plan, events = run_step(sched, runner)
    assert plan.freed == ("a",) and plan.scheduled == ("b",)
    assert "a" not in runner.states
    failed = [e for e in events if isinstance(e, RequestFailed)]
    assert [(e.request_id, e.reason) for e in failed] == [("a", "aborted")]
    assert not sched.abort("a") and not sched.abort("nope")


def test_abort_of_a_waiting_request_removes_it_without_running():
    sched, runner = Scheduler(SchedulerConfig(max_batch_rows=2), clock=Clock()), FakeRunner()
    for rid in "abc":
        sched.add_request(make_request(rid, steps=2))
    run_step(sched, runner)
    assert sched.abort("c")
    seen = set()
    while sched.has_unfinished():
        plan, _ = run_step(sched, runner)
        seen |= set(plan.scheduled)
    assert seen == {"a", "b"}


def test_fifo_admission_no_overtaking():
    sched, runner = Scheduler(SchedulerConfig(max_batch_rows=4), clock=Clock()), FakeRunner()
    sched.add_request(make_request("big1", steps=3))  # 2 rows
    sched.add_request(make_request("big2", steps=3))  # 2 rows
    sched.add_request(make_request("big3", steps=3))  # must wait
    sched.add_request(make_request("small", steps=1, cfg=False))  # would fit, but arrived later
    admitted = []
    while sched.has_unfinished():
        plan, _ = run_step(sched, runner)
        admitted += [d.request_id for d in plan.new_requests]
        assert "small" not in plan.scheduled or "big3" in admitted
    assert admitted == ["big1", "big2", "big3", "small"]


def test_queue_bound_and_oversized_requests_are_refused():
    sched = Scheduler(SchedulerConfig(max_batch_rows=4, max_latent_tokens=100, max_waiting=2), clock=Clock())
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("c"))
    with pytest.raises(InvalidRequestError, match="budget"):
        Scheduler(SchedulerConfig(max_latent_tokens=100)).add_request(make_request("x", tokens=64))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add_request(make_request("a"))


def test_finished_and_aborted_requests_have_final_status():
    sched, runner = Scheduler(SchedulerConfig(), clock=Clock()), FakeRunner()
    a, b = make_request("a", steps=1), make_request("b", steps=5)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, runner)
    sched.abort("b")
    assert a.status is RequestStatus.FINISHED and b.status is RequestStatus.ABORTED
