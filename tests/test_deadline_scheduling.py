"""Deadline-aware scheduling with a fake clock and a fake runner: no model, no tensors.

The fake runner advances the clock by a modelled step cost (``PER_ROW_S`` per row), and
the scheduler's profile is seeded with the same model, so predictions are exact and
every assertion about deadlines is deterministic.
"""

from __future__ import annotations

import pytest
from scheduling_fakes import FakeRunner, ManualClock, linear_profile, make_request, run_until_done

from glideserve.config import SchedulerConfig
from glideserve.errors import SLOUnattainableError
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.request import RequestStatus
from glideserve.scheduler.profile import LatencyProfile
from glideserve.scheduler.scheduler import Scheduler

PER_ROW_S = 0.01  # a step of r rows takes r x 10 ms at 32x32 (16 tokens per row)


def setup(policy="slack", profile: LatencyProfile | None = None, **config):
    # The fake runner costs exactly what the profile predicts: no margin for prediction error needed.
    config.setdefault("admission_margin", 0.0)
    clock = ManualClock()
    profile = profile if profile is not None else linear_profile(PER_ROW_S)
    sched = Scheduler(SchedulerConfig(policy=policy, **config), clock=clock, profile=profile)
    runner = FakeRunner(clock, group_s=lambda tokens, rows: rows * PER_ROW_S)
    return sched, runner, clock


def add(sched, clock, rid, **kwargs):
    request = make_request(rid, arrival=clock.now, **kwargs)
    sched.add_request(request)
    return request


def test_an_infeasible_request_is_refused_at_once_and_feasible_ones_keep_their_deadlines():
    sched, runner, clock = setup(max_batch_rows=4)  # two guided requests at a time
    # Alone a 10-step guided request takes 10 x 20 ms = 0.2 s; two together 10 x 40 ms = 0.4 s.
    a = add(sched, clock, "a", steps=10, slo_ms=500)
    b = add(sched, clock, "b", steps=10, slo_ms=500)
    with pytest.raises(SLOUnattainableError) as refused:
        add(sched, clock, "c", steps=10, slo_ms=500)  # waits 0.4 s, then 0.2 s alone: 0.6 s > 0.5 s
    assert refused.value.code == "slo_unattainable" and refused.value.http_status == 429
    assert "predicted latency 0.60 s" in refused.value.message and refused.value.retry_after_s >= 1
    assert sched.counters.refused == 1 and sched.num_waiting == 2
    finals = run_until_done(sched, runner, clock)
    assert set(finals) == {"a", "b"}
    for request in (a, b):
        event, at = finals[request.request_id]
        assert isinstance(event, GenerationResult) and at <= request.deadline + 1e-6


def test_a_request_that_would_push_an_admitted_one_past_its_deadline_is_refused():
    sched, runner, clock = setup(policy="edf", max_batch_rows=2)  # one guided request at a time
    add(sched, clock, "a", steps=10, slo_ms=250)  # 0.0-0.2 s
    b = add(sched, clock, "b", steps=10, slo_ms=450)  # 0.2-0.4 s
    with pytest.raises(SLOUnattainableError, match="would make an admitted request miss its deadline"):
        add(sched, clock, "d", steps=10, slo_ms=420)  # earlier deadline than b: it would run first, b late
    finals = run_until_done(sched, runner, clock)
    assert finals["b"][1] <= b.deadline


def test_fcfs_is_deadline_blind():
    sched, runner, clock = setup(policy="fcfs", max_batch_rows=4)
    for rid in "abc":
        add(sched, clock, rid, steps=10, slo_ms=500)  # c would be refused by a deadline-aware policy
    finals = run_until_done(sched, runner, clock)
    assert all(isinstance(e, GenerationResult) for e, _ in finals.values())
    assert finals["c"][1] > 0.5  # late, but served
    assert sched.counters.refused == sched.counters.dropped == 0


def test_a_joining_candidate_that_would_make_a_member_late_is_held_back():
    sched, runner, clock = setup()
    a = add(sched, clock, "a", steps=10, slo_ms=250)  # alone 0.2 s; with b beside it 0.4 s: late
    add(sched, clock, "b", steps=10)  # best effort
    finals = run_until_done(sched, runner, clock)
    assert finals["a"][1] <= a.deadline
    b_start = next(i for i, plan in enumerate(runner.plans) if "b" in plan.scheduled)
    # Held back while joining made a late; joined for a's last steps once that cost no deadline.
    assert 0 < b_start < 10 and sched.counters.held_back >= b_start
    assert isinstance(finals["b"][0], GenerationResult)


def test_a_candidate_joins_when_members_stay_on_time():
    sched, runner, clock = setup()
    add(sched, clock, "a", steps=10, slo_ms=1000)  # 0.4 s with b beside it: on time
    add(sched, clock, "b", steps=10)
    run_until_done(sched, runner, clock)
    assert runner.plans[0].scheduled == ("a", "b")


def test_preemption_pauses_a_running_request_and_resumes_it_without_a_new_prefill():
    sched, runner, clock = setup(max_batch_rows=2)  # one guided request at a time
    a = add(sched, clock, "a", steps=20)  # best effort, 0.4 s alone
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    b = add(sched, clock, "b", steps=10, slo_ms=300)  # waiting for a would finish at 0.6 s
    finals = run_until_done(sched, runner, clock)
    paused_at = next(i for i, plan in enumerate(runner.plans) if plan.preempted)
    assert runner.plans[paused_at].preempted == ("a",) and "b" in runner.plans[paused_at].scheduled
    assert any(plan.resumed == ("a",) for plan in runner.plans)
    assert finals["b"][1] <= b.deadline
    assert isinstance(finals["a"][0], GenerationResult) and runner.steps_run["a"] == 20
    assert sum(d.request_id == "a" for plan in runner.plans for d in plan.new_requests) == 1  # kept, not re-prefilled
    assert a.preemptions == 1 and sched.counters.preempted == sched.counters.resumed == 1


def test_no_preemption_when_the_victim_would_miss_its_own_deadline():
    sched, runner, clock = setup(max_batch_rows=2)
    add(sched, clock, "a", steps=20, slo_ms=450)  # 0.4 s alone: pausing it for 0.2 s makes it late
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    with pytest.raises(SLOUnattainableError):
        add(sched, clock, "b", steps=10, slo_ms=300)
    run_until_done(sched, runner, clock)
    assert not any(plan.preempted for plan in runner.plans)


def test_paused_requests_are_bounded():
    sched, runner, clock = setup(max_batch_rows=2, max_paused=0)
    add(sched, clock, "a", steps=20)
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    with pytest.raises(SLOUnattainableError):  # without preemption it cannot make it
        add(sched, clock, "b", steps=10, slo_ms=300)


def test_requests_that_fall_too_far_behind_are_dropped_and_freed():
    sched, runner, clock = setup(max_batch_rows=4, drop_late_after=0.5)
    for rid in "ab":
        add(sched, clock, rid, steps=10, slo_ms=500)
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    runner.group_s = lambda tokens, rows: rows * PER_ROW_S * 8  # the machine slows down eightfold
    finals = run_until_done(sched, runner, clock)
    dropped = {rid for rid, (e, _) in finals.items() if isinstance(e, RequestFailed)}
    assert dropped, "predicted to finish far past their deadline, they should have been dropped"
    for rid in dropped:
        event = finals[rid][0]
        assert event.reason == "deadline_exceeded" and "slo_ms=500" in event.message
        assert any(rid in plan.freed for plan in runner.plans) and rid not in runner.states
    assert sched.counters.dropped == len(dropped)


def test_profile_follows_observed_steps():
    profile = linear_profile(PER_ROW_S)
    sched, runner, clock = setup(profile=profile)
    runner.group_s = lambda tokens, rows: rows * 0.03  # three times slower than profiled
    add(sched, clock, "a", steps=60, cfg=False)
    run_until_done(sched, runner, clock)
    assert profile.group_s(16, 1) == pytest.approx(0.03, rel=0.01)
    empty = LatencyProfile()
    sched, runner, clock = setup(profile=empty)
    add(sched, clock, "b", steps=3, size=64)  # a size the profile has never seen
    run_until_done(sched, runner, clock)
    assert empty.group_s(64, 2) == pytest.approx(0.02)


def test_best_effort_requests_progress_under_a_steady_stream_of_deadline_requests():
    # One guided request at a time, and a deadline request arriving at every step: a deadline
    # request is always waiting, so without aging the best-effort one would never run.
    sched, runner, clock = setup(max_batch_rows=2, best_effort_wait_s=2.0)
    admitted, lazy = {}, []

    def arrivals(step):
        if step == 20:
            lazy.append(add(sched, clock, "lazy", steps=10, priority=-5))
        if clock.now < 10.0:
            try:
                request = add(sched, clock, f"d{step}", steps=10, slo_ms=800)
                admitted[request.request_id] = request
            except SLOUnattainableError:
                pass

    finals = run_until_done(sched, runner, clock, on_step=arrivals, until=10.0)
    assert isinstance(finals["lazy"][0], GenerationResult)
    waited = finals["lazy"][1] - lazy[0].arrival_time
    # It waits out the aging bound, then the deadlines already promised (at most one SLO), then runs.
    assert 2.0 < waited <= 2.0 + 0.8 + 0.2 + 0.05
    assert len(admitted) > 30
    for rid, request in admitted.items():
        event, at = finals[rid]
        assert isinstance(event, GenerationResult) and at <= request.deadline + 1e-6, (rid, event)


@pytest.mark.parametrize("policy, first", [("edf", "short"), ("slack", "long")])
def test_edf_and_slack_order(policy, first):
    sched, runner, clock = setup(policy=policy, max_batch_rows=2, max_paused=0, drop_late_after=None)
    blocker = add(sched, clock, "blocker", steps=1)
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    assert blocker.status is RequestStatus.FINISHED
    add(sched, clock, "short", steps=2, slo_ms=10_000)
    add(sched, clock, "long", steps=40, slo_ms=10_000)  # same deadline, far more steps: less slack
    plan = sched.schedule()
    assert plan.scheduled == (first,)


def test_priority_orders_best_effort_requests():
    sched, runner, clock = setup(max_batch_rows=2)
    for rid, priority in (("low", -1), ("mid", 0), ("high", 7)):
        add(sched, clock, rid, steps=1, priority=priority)
    order = []
    while sched.has_unfinished():
        plan = sched.schedule()
        order += [d.request_id for d in plan.new_requests]
        sched.update(plan, runner.execute(plan))
    assert order == ["high", "mid", "low"]


def test_finished_images_are_decoded_together_while_requests_wait():
    sched, runner, clock = setup(max_batch_rows=4, max_decode_wait_steps=3, policy="fcfs")
    for i, steps in enumerate((4, 5, 6, 9, 9)):
        add(sched, clock, f"r{i}", steps=steps, cfg=False)
    run_until_done(sched, runner, clock)  # the fake runner asserts nothing is decoded before its last step
    decodes = [plan.decode for plan in runner.plans if plan.decode]
    assert max(len(d) for d in decodes) >= 2, decodes  # batched while r4 waited for a slot
    assert sorted(rid for d in decodes for rid in d) == [f"r{i}" for i in range(5)]
    # Unsaturated (nothing waits, room in the batch): decoded in the step of its last denoising step.
    sched, runner, clock = setup(max_batch_rows=16)
    add(sched, clock, "alone", steps=3, cfg=False)
    run_until_done(sched, runner, clock)
    assert [plan.decode for plan in runner.plans] == [(), (), ("alone",)]


def test_a_finished_image_never_waits_past_its_deadline_for_companions():
    sched, runner, clock = setup(max_batch_rows=2, max_decode_wait_steps=50, drop_late_after=None)
    first = add(sched, clock, "first", steps=2, cfg=False, slo_ms=60)
    add(sched, clock, "second", steps=2, cfg=False, slo_ms=60)
    for i in range(6):
        add(sched, clock, f"more{i}", steps=8, cfg=False)
    finals = run_until_done(sched, runner, clock)
    assert finals["first"][1] <= first.deadline


def test_waiting_prompts_are_encoded_ahead_with_new_arrivals_once():
    sched, runner, clock = setup(max_batch_rows=2, max_prefill_batch=3, policy="fcfs")
    for i in range(6):
        add(sched, clock, f"r{i}", steps=2, cfg=False, prompt=f"prompt {i}")
    run_until_done(sched, runner, clock)
    first = runner.plans[0]
    assert [d.request_id for d in first.new_requests] == ["r0", "r1"]
    assert first.encode_ahead == ("prompt 2",)  # room for 3 prompts per call, two taken by arrivals
    ahead = [text for plan in runner.plans for text in plan.encode_ahead]
    assert len(ahead) == len(set(ahead))
    for plan in runner.plans:
        assert not set(plan.encode_ahead) & {d.params.prompt for d in plan.new_requests}


def test_admission_keeps_a_margin_of_the_slo_for_prediction_error():
    # Alone, the request takes 3 steps x 2 rows x 10 ms = 60 ms.
    sched, _, _ = setup(admission_margin=0.25)
    sched.add_request(make_request("fits", slo_ms=80))  # 60 ms <= 80 - 20
    with pytest.raises(SLOUnattainableError):
        setup(admission_margin=0.25)[0].add_request(make_request("tight", slo_ms=70))  # 60 > 70 - 17.5
    setup(admission_margin=0.0)[0].add_request(make_request("exact", slo_ms=60))
