"""Step caching inside mixed batches: the owned SD3 block loop, per-row decisions, memory accounting.

Model tests use tiny random SD3 models; scheduler tests use the fake runner (no tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from glideserve import Engine, GenerationParams, GenerationResult
from glideserve.cache.policy import NO_CACHE, CachePolicy, StepKind, parse_cache_policy
from glideserve.config import SchedulerConfig
from glideserve.errors import InvalidRequestError
from glideserve.request import Request
from glideserve.runner.families.sd3_loop import SD3BlockLoop
from glideserve.runner.feature_cache import FeatureCache, RowGroup
from glideserve.scheduler.caching import StepKindPlanner, record_step_kind
from glideserve.scheduler.scheduler import Scheduler
from tests.scheduling_fakes import FakeRunner

FULL, CACHED, AUTO = StepKind.FULL, StepKind.CACHED, StepKind.AUTO


# -- parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("none", NO_CACHE), ("glideserve:5", CachePolicy("glideserve", interval=5)),
    ("FORA:2", CachePolicy("fora", interval=2)), ("teacache:0.1", CachePolicy("teacache", threshold=0.1)),
    ("fbcache:.08", CachePolicy("fbcache", threshold=0.08)), (" taylorseer:3 ", CachePolicy("taylorseer", interval=3)),
    ("teacache:0.00001", CachePolicy("teacache", threshold=0.00001)), ("fbcache:10", CachePolicy("fbcache", threshold=10)),
    ("teacache:0.123456", CachePolicy("teacache", threshold=0.123456)), ("adaptive", CachePolicy("adaptive")),
])
def test_policies_parse_to_their_canonical_form(text, expected):
    policy = parse_cache_policy(text)
    assert policy == expected
    assert parse_cache_policy(str(policy)) == policy


@pytest.mark.parametrize("text", ["", "glideserve", "glideserve:0", "glideserve:51", "glideserve:-1", "fora:1.5",
                                  "teacache:0", "teacache:nan", "teacache:inf", "teacache:1e-1", "fbcache:1_0",
                                  "teacache:11", "teacache:0.1234567", "none:1", "adaptive:2", "deepcache", "lru:3", "glideserve:٣", 5, None])
def test_bad_policies_are_invalid_requests(text):
    with pytest.raises(InvalidRequestError) as info:
        parse_cache_policy(text)
    assert info.value.param == "cache"


# -- the owned block loop equals diffusers ---------------------------------------------------
def _transformer(dual: bool) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                 **extra).eval()


def _inputs(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g) * 1000,
            {"encoder_hidden_states": torch.randn(rows, 7, 32, generator=g),
             "pooled_projections": torch.randn(rows, 32, generator=g)})


@pytest.mark.parametrize("dual", [False, True], ids=["sd3", "sd3.5-dual-attention"])
@torch.inference_mode()
def test_block_loop_equals_diffusers_forward_bit_for_bit(dual):
    model = _transformer(dual)
    latents, timesteps, cond = _inputs(5)
    expected = model(hidden_states=latents, timestep=timesteps, return_dict=False, **cond)[0]
    got, kinds = SD3BlockLoop(model)(latents, timesteps, cond, [RowGroup(0, 5, FULL, None, 0)])
    assert torch.equal(got, expected)
    assert kinds == [FULL]


def _cache(text: str) -> FeatureCache:
    return FeatureCache(parse_cache_policy(text))


@pytest.mark.parametrize("policy", ["glideserve:2", "fora:2", "teacache:0.5", "fbcache:0.5", "taylorseer:2"])
@pytest.mark.parametrize("dual", [False, True], ids=["sd3", "sd3.5-dual-attention"])
@torch.inference_mode()
def test_each_row_gets_what_it_gets_alone_in_a_mixed_batch(policy, dual):
    """Rows with different policies and kinds share forwards; each row's output equals its output
    alone under the same sequence of step kinds, and the kinds decided per row are the same."""
    model = _transformer(dual)
    loop = SD3BlockLoop(model)
    # Request A (2 rows, the policy under test), B (1 row, no cache), C (2 rows, glideserve:1).
    sizes = {"a": 2, "b": 1, "c": 2}
    policies = {"a": policy, "b": "none", "c": "glideserve:1"}
    mixed = {k: (None if p == "none" else _cache(p)) for k, p in policies.items()}
    alone = {k: (None if p == "none" else _cache(p)) for k, p in policies.items()}
    schedule = [{"a": FULL, "b": FULL, "c": FULL}, {"a": CACHED, "b": FULL, "c": CACHED},
                {"a": CACHED, "b": FULL, "c": FULL}, {"a": FULL, "b": FULL, "c": CACHED},
                {"a": CACHED, "b": FULL, "c": FULL}]
    threshold = policy.startswith(("teacache", "fbcache"))
    for step, kinds in enumerate(schedule):
        latents, timesteps, cond = _inputs(5, seed=10 + step)
        timesteps = torch.tensor([900.0 - 100 * step] * 2 + [500.0] + [700.0 - 50 * step] * 2)
        kinds = {k: (AUTO if threshold and k == "a" and v is CACHED else v) for k, v in kinds.items()}
        groups, at = [], 0
        for k in ("a", "b", "c"):
            groups.append(RowGroup(at, sizes[k], kinds[k], mixed[k], step))
            at += sizes[k]
        out, taken = loop(latents, timesteps, cond, groups)
        for k, g, kind in zip(("a", "b", "c"), groups, taken):
            rows = slice(g.start, g.stop)
            one = {name: value[rows] for name, value in cond.items()}
            ref, ref_kind = loop(latents[rows], timesteps[rows], one, [RowGroup(0, g.rows, kinds[k], alone[k], step)])
            assert ref_kind == [kind], (k, step)
            torch.testing.assert_close(out[rows], ref, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_cached_step_skips_the_blocks_and_uses_the_new_timestep():
    model = _transformer(False)
    loop = SD3BlockLoop(model)
    latents, timesteps, cond = _inputs(1)
    cache = _cache("glideserve:3")
    loop(latents, timesteps, cond, [RowGroup(0, 1, FULL, cache, 0)])
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in model.transformer_blocks]
    hooks += [b.attn.register_forward_hook(lambda *a: calls.append(1)) for b in model.transformer_blocks]
    try:
        first, kinds = loop(latents, timesteps, cond, [RowGroup(0, 1, CACHED, cache, 1)])
        second, _ = loop(latents, timesteps * 0.5, cond, [RowGroup(0, 1, CACHED, cache, 2)])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and kinds == [CACHED]
    assert not torch.allclose(first, second)  # the final adaLN is modulated by each step's own timestep


@torch.inference_mode()
def test_threshold_rows_decide_from_their_own_statistics():
    """A teacache row's decision does not depend on what else is in the batch."""
    model = _transformer(False)
    loop = SD3BlockLoop(model)
    decisions = {}
    for companion_scale in (0.0, 50.0):
        cache = _cache("teacache:0.04")
        seen = []
        for step in range(6):
            latents, timesteps, cond = _inputs(2, seed=3)
            latents[1] = latents[1] * companion_scale  # a wildly different companion row
            latents[0] = latents[0] * (1 + 0.03 * step)
            timesteps = torch.tensor([1000.0 - 30 * step, 10.0 * step])
            kind = FULL if step == 0 else AUTO
            _, kinds = loop(latents, timesteps, cond, [RowGroup(0, 1, kind, cache, step), RowGroup(1, 1, FULL, None, step)])
            seen.append(kinds[0])
        decisions[companion_scale] = seen
    assert decisions[0.0] == decisions[50.0]
    assert CACHED in decisions[0.0] and decisions[0.0].count(FULL) >= 2


@torch.inference_mode()
def test_cache_bytes_match_what_a_request_stores(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    family = engine.core.runner.family
    for text in ("glideserve:2", "fora:2", "teacache:5", "fbcache:5", "taylorseer:2"):
        policy = parse_cache_policy(text)
        params = GenerationParams("a red circle", num_inference_steps=4, guidance_scale=3.0, seed=1,
                                  cache=text).resolve(engine.core.spec)
        stored = []
        state_cache = FeatureCache(policy)
        latents = torch.randn(2, *engine.core.spec.latent_shape(params.height, params.width))
        cond = {"encoder_hidden_states": torch.randn(2, 16 + 154, family.pipe.transformer.config.joint_attention_dim)}
        cond["pooled_projections"] = torch.randn(2, family.pipe.transformer.config.pooled_projection_dim)
        for step, kind in enumerate([FULL, AUTO if policy.kind in ("teacache", "fbcache") else CACHED, FULL]):
            family.denoise(latents, torch.tensor([800.0 - step, 800.0 - step]), cond,
                           [RowGroup(0, 2, kind, state_cache, step)])
            stored.append(state_cache.nbytes())
        assert max(stored) == family.cache_bytes(policy, params), text


# -- scheduling of step kinds --------------------------------------------------------------
def plan_step_kinds(scheduled, full_slots, full_fraction=1.0, floor=0.34):
    return StepKindPlanner(full_slots, floor).plan(scheduled, full_fraction)


def _request(rid: str, policy: str = "glideserve:2", steps: int = 10, granted: bool = True) -> Request:
    params = GenerationParams("p", num_inference_steps=steps, guidance_scale=2.0, seed=1, height=64, width=64,
                              request_id=rid, cache=policy)
    return Request(rid, params, num_steps=steps, rows=2, tokens_per_row=64, arrival_time=0.0,
                   cache_policy=parse_cache_policy(policy), cache_bytes=1000, cache_granted=granted)


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_glideserve_alone_takes_full_steps_at_multiples_of_interval_plus_one(interval):
    req = _request("a", f"glideserve:{interval}", steps=50)
    full = []
    for step in range(50):
        kind = plan_step_kinds([req], full_slots=None)["a"]
        if kind is FULL:
            full.append(step)
        record_step_kind(req, kind)
        req.steps_done += 1
    assert full == list(range(0, 50, interval + 1))
    assert req.full_steps == len(full) and req.cached_steps == 50 - len(full)


def test_full_slots_prefer_first_steps_then_the_longest_exhausted_counters():
    reqs = [_request(f"r{i}") for i in range(4)]
    reqs[0].steps_done, reqs[0].cache_counter = 3, -2   # ran out two steps ago
    reqs[1].steps_done, reqs[1].cache_counter = 3, 0    # ran out now
    reqs[2].steps_done = 0                               # first step: always full
    reqs[3].steps_done, reqs[3].cache_counter = 2, 1    # still has a cached step
    kinds = plan_step_kinds(reqs, full_slots=2)
    assert kinds == {"r2": FULL, "r0": FULL, "r1": CACHED, "r3": CACHED}
    none = _request("n", "none")
    assert plan_step_kinds([none], full_slots=1)["n"] is FULL
    ungranted = _request("u", granted=False)
    ungranted.steps_done, ungranted.cache_counter = 4, 1
    assert plan_step_kinds([ungranted], full_slots=None)["u"] is FULL
    teacache = _request("t", "teacache:0.1")
    teacache.steps_done = 3
    assert plan_step_kinds([teacache], full_slots=None)["t"] is AUTO


def _scheduler(**config) -> Scheduler:
    return Scheduler(SchedulerConfig(policy="fcfs", **config))


def _run(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return
        plan = scheduler.schedule()
        scheduler.update(plan, runner.execute(plan))


def test_cache_memory_is_claimed_at_admission_and_freed_on_finish_abort_and_drop():
    scheduler, runner = _scheduler(cache_memory_mb=1.0), FakeRunner()
    a, b, c = _request("a", steps=3), _request("b", steps=50), _request("c", steps=50)
    for r in (a, b, c):
        r.cache_granted = False
        scheduler.add_request(r)
    plan = scheduler.schedule()
    assert all(d.cache_granted for d in plan.new_requests)
    assert scheduler.memory.used == 3000
    scheduler.update(plan, runner.execute(plan))
    scheduler.abort("b")
    assert scheduler.memory.used == 2000 and not scheduler.memory.holds("b")
    _run(scheduler, runner, max_steps=3)
    assert not scheduler.memory.holds("a")  # denoised: its cache is gone before its decode
    scheduler._drop_late  # drops go through the same removal as aborts
    req = scheduler._find("c")
    scheduler._remove(req)
    assert scheduler.memory.used == 0


def test_requests_beyond_the_cache_budget_run_full_steps():
    scheduler, runner = _scheduler(cache_memory_mb=2500 / 2**20), FakeRunner()
    reqs = [_request(f"r{i}", steps=4) for i in range(3)]
    for r in reqs:
        r.cache_granted = False
        scheduler.add_request(r)
    plan = scheduler.schedule()
    granted = {d.request_id: d.cache_granted for d in plan.new_requests}
    assert granted == {"r0": True, "r1": True, "r2": False}
    assert scheduler.memory.used <= scheduler.memory.budget_bytes
    for _ in range(3):
        scheduler.update(plan, runner.execute(plan))
        plan = scheduler.schedule()
        assert plan.step_kinds["r2"] is FULL


def test_progressive_batching_bounds_requests_in_flight():
    scheduler, runner = _scheduler(full_slots=1), FakeRunner()
    for i in range(8):
        scheduler.add_request(_request(f"r{i}", "glideserve:2", steps=20))
    plan = scheduler.schedule()
    assert len(plan.scheduled) == 1 * 2 + 1
    scheduler.update(plan, runner.execute(plan))
    plan = scheduler.schedule()
    assert sum(1 for k in plan.step_kinds.values() if k is FULL) <= 1


# -- end to end through the engine ---------------------------------------------------------
def _generate(engine: Engine, params: list[GenerationParams]) -> dict[str, GenerationResult]:
    for p in params:
        engine.add_request(p)
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, GenerationResult):
                results[event.request_id] = event
    return results


def test_engine_reports_full_and_cached_steps_and_none_stays_default(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    base = dict(num_inference_steps=9, guidance_scale=3.0, seed=7)
    results = _generate(engine, [GenerationParams("a red circle", cache="glideserve:2", request_id="g", **base),
                                 GenerationParams("a red circle", request_id="n", **base)])
    assert (results["g"].timings.full_steps, results["g"].timings.cached_steps) == (3, 6)
    assert (results["n"].timings.full_steps, results["n"].timings.cached_steps) == (9, 0)
    assert results["n"].params.cache == "none"
    assert engine.core.scheduler.memory.used == 0


def test_engine_default_cache_policy_and_unsupported_family(tiny_sd3_dir, tiny_sd15_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, default_cache="fora:3")
    results = _generate(engine, [GenerationParams("a red circle", num_inference_steps=8, guidance_scale=3.0, seed=1,
                                                  request_id="f")])
    assert results["f"].params.cache == "fora:3" and results["f"].timings.cached_steps == 6
    unet = Engine.from_pretrained(tiny_sd15_dir)
    with pytest.raises(InvalidRequestError, match="not available for a sd15 model"):
        unet.add_request(GenerationParams("x", cache="glideserve:2"))


# -- latent-aware denoising ------------------------------------------------------------------
def test_latent_aware_step_is_the_seeds_data_prediction_step_with_the_adapted_estimate():
    from glideserve.runner.latent_aware import adapt_factor, latent_aware_step

    g = torch.Generator().manual_seed(0)
    latents, velocity = torch.randn(1, 4, 8, 8, generator=g) * 3, torch.randn(1, 4, 8, 8, generator=g)
    factor, edge = adapt_factor(latents)
    assert 0.7 <= float(factor) <= 1.0 and not 0.7 < float(edge) < 0.9  # no extra noise for these latents
    sigma, sigma_next = 0.8, 0.6
    new_latents, new_velocity = latent_aware_step(latents, velocity, g)
    assert torch.equal(new_latents, latents)
    # First-order data-prediction step with D = x - sigma_adapt v, against Euler's flow step with the new velocity.
    denoised = latents - sigma * factor * velocity
    seed_step = (sigma_next / sigma) * latents + (1 - sigma_next / sigma) * denoised
    torch.testing.assert_close(latents + (sigma_next - sigma) * new_velocity, seed_step)


def test_latent_aware_is_deterministic_per_seed_and_only_for_flow_models(tiny_sd3_dir, tiny_sd15_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    base = dict(num_inference_steps=5, guidance_scale=3.0, seed=11)
    results = _generate(engine, [GenerationParams("a red circle", latent_aware=True, request_id="a1", **base),
                                 GenerationParams("a red circle", latent_aware=True, request_id="a2", **base),
                                 GenerationParams("a red circle", request_id="n", **base)])
    pixels = {k: torch.from_numpy(np.array(r.image)) for k, r in results.items()}
    assert torch.equal(pixels["a1"], pixels["a2"])
    assert not torch.equal(pixels["a1"], pixels["n"])
    unet = Engine.from_pretrained(tiny_sd15_dir)
    with pytest.raises(InvalidRequestError, match="flow-matching"):
        unet.add_request(GenerationParams("x", latent_aware=True))


# -- the adaptive policy (fake runner, manual clock) ------------------------------------------
PER_ROW_S = 0.01


def _adaptive_setup(**config):
    from tests.scheduling_fakes import ManualClock, linear_profile

    config.setdefault("admission_margin", 0.0)
    clock = ManualClock()
    sched = Scheduler(SchedulerConfig(policy="slack", **config), clock=clock, profile=linear_profile(PER_ROW_S))
    runner = FakeRunner(clock, group_s=lambda tokens, rows: rows * PER_ROW_S, cached_share=0.1)
    return sched, runner, clock


def _serve(sched, runner, clock, arrivals: dict[int, list[Request]], max_steps: int = 2000):
    """Add requests at their step numbers, run until done; returns {id: (event, finish time)} and refusals."""
    from glideserve.errors import SLOUnattainableError
    from tests.scheduling_fakes import run_until_done

    refused = []

    def arrive(step: int) -> None:
        for req in arrivals.get(step, []):
            req.arrival_time = clock.now
            try:
                sched.add_request(req)
            except SLOUnattainableError:
                refused.append(req.request_id)

    finals = run_until_done(sched, runner, clock, max_steps, on_step=arrive, min_steps=max(arrivals) + 1)
    return finals, refused


def _adaptive_requests(n: int, slo_ms: float, cache: str = "adaptive") -> list[Request]:
    from tests.scheduling_fakes import make_request

    return [make_request(f"r{i}", steps=10, slo_ms=slo_ms, cache=cache) for i in range(n)]


def test_adaptive_is_exact_again_as_soon_as_pressure_ends():
    planner = StepKindPlanner(None, 0.33)
    reqs = [_request(f"r{i}", "adaptive") for i in range(4)]
    for r in reqs:
        r.steps_done, r.cache_counter = 5, -2  # all at the streak limit: forced full beyond the budget
    planner.plan(reqs, full_fraction=0.34)
    assert set(planner.plan(reqs, full_fraction=1.0).values()) == {FULL}


def test_adaptive_is_exact_at_low_load():
    sched, runner, clock = _adaptive_setup()
    requests = _adaptive_requests(3, slo_ms=5000)
    finals, refused = _serve(sched, runner, clock, {0: requests[:1], 40: requests[1:2], 80: requests[2:]})
    assert not refused
    for rid, (event, _) in finals.items():
        assert (event.timings.full_steps, event.timings.cached_steps) == (10, 0), rid
    assert sched.full_fraction == 1.0


def test_adaptive_caches_under_overload_to_keep_deadlines_never_below_the_floor():
    # 8 guided requests of 10 steps fill a 16-row batch: 0.16 s a full step, 1.6 s all full, past a 1 s SLO.
    sched, runner, clock = _adaptive_setup(min_full_fraction=0.33)
    finals, refused = _serve(sched, runner, clock, {0: _adaptive_requests(8, slo_ms=1000)})
    assert not refused and len(finals) == 8
    for rid, (event, finish) in finals.items():
        assert isinstance(event, GenerationResult), rid
        assert finish <= 1.0 + 1e-6, (rid, finish)
        t = event.timings
        assert t.cached_steps > 0 and t.full_steps / t.steps >= 0.33, (rid, t)
    # Without caching the same load is refused in part: caching buys deadlines, not just speed.
    sched, runner, clock = _adaptive_setup()
    _, refused_exact = _serve(sched, runner, clock, {0: _adaptive_requests(8, slo_ms=1000, cache="none")})
    assert refused_exact


def test_adaptive_never_takes_more_cached_steps_in_a_row_than_the_floor_allows():
    planner = StepKindPlanner(None, min_full_fraction=0.25)  # at most 3 cached steps in a row
    req = _request("a", "adaptive", steps=40)
    streak = longest = 0
    for _ in range(40):
        kind = planner.plan([req], full_fraction=0.0)["a"]
        streak = streak + 1 if kind is CACHED else 0
        longest = max(longest, streak)
        record_step_kind(req, kind, 0.01)
        req.steps_done += 1
    assert longest == 3 and req.full_steps == 10


def test_adaptive_gives_full_steps_to_the_requests_whose_inputs_changed_most():
    calm, busy = _request("calm", "adaptive"), _request("busy", "adaptive")
    for r, drift in ((calm, 0.05), (busy, 0.4)):
        r.steps_done, r.cache_counter, r.cache_drift = 3, -1, drift
    kinds = StepKindPlanner(None, 0.2).plan([calm, busy], full_fraction=0.5)
    assert kinds == {"busy": FULL, "calm": CACHED}


# -- DeepCache on UNets --------------------------------------------------------------------------
def _unet(xl: bool):
    from glideserve.models.build import UNetDims, build_unet_pipeline

    return build_unet_pipeline(UNetDims(xl=xl)).unet.eval()


def _unet_inputs(unet, rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    cond = {"encoder_hidden_states": torch.randn(rows, 7, config.cross_attention_dim, generator=g)}
    if config.addition_embed_type == "text_time":
        time_ids = 6 * config.addition_time_embed_dim
        cond["text_embeds"] = torch.randn(rows, config.projection_class_embeddings_input_dim - time_ids, generator=g)
        cond["time_ids"] = torch.rand(rows, 6, generator=g) * 64
    return torch.randn(rows, config.in_channels, 8, 8, generator=g), torch.rand(rows, generator=g) * 1000, cond


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
@torch.inference_mode()
def test_unet_loop_equals_diffusers_forward_bit_for_bit(xl):
    from glideserve.runner.families.unet_loop import UNetBlockLoop

    unet = _unet(xl)
    latents, timesteps, cond = _unet_inputs(unet, 3)
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
    expected = unet(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=added, return_dict=False)[0]
    got, kinds = UNetBlockLoop(unet)(latents, timesteps, cond, [RowGroup(0, 3, FULL, None, 0)])
    assert torch.equal(got, expected) and kinds == [FULL]


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
@torch.inference_mode()
def test_deepcache_rows_in_a_mixed_batch_get_what_they_get_alone(xl):
    from glideserve.runner.families.unet_loop import UNetBlockLoop

    unet = _unet(xl)
    loop = UNetBlockLoop(unet)
    mixed = {"a": _cache("deepcache:2"), "b": None}
    alone = {"a": _cache("deepcache:2"), "b": None}
    deep_calls = []
    hook = unet.mid_block.register_forward_hook(
        lambda module, args, kwargs, out: deep_calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        for step, kind_a in enumerate([FULL, CACHED, CACHED, FULL, CACHED]):
            latents, timesteps, cond = _unet_inputs(unet, 3, seed=20 + step)
            groups = [RowGroup(0, 2, kind_a, mixed["a"], step), RowGroup(2, 1, FULL, None, step)]
            out, kinds = loop(latents, timesteps, cond, groups)
            assert kinds == [kind_a, FULL]
            for key, g in zip(("a", "b"), groups):
                rows = slice(g.start, g.stop)
                one = {name: value[rows] for name, value in cond.items()}
                ref, _ = loop(latents[rows], timesteps[rows], one, [RowGroup(0, g.rows, g.kind, alone[key], step)])
                torch.testing.assert_close(out[rows], ref, rtol=1e-4, atol=1e-5)
    finally:
        hook.remove()
    # The mid block (the deep path) sees only full rows. Per step: the mixed forward (3 rows, or b's 1 row when
    # a is cached), then a alone (2 rows, nothing when cached), then b alone (1 row).
    per_kind = {FULL: [3, 2, 1], CACHED: [1, 1]}
    assert deep_calls == [n for kind in [FULL, CACHED, CACHED, FULL, CACHED] for n in per_kind[kind]]


def test_deepcache_through_the_engine(tiny_sd15_dir):
    engine = Engine.from_pretrained(tiny_sd15_dir)
    results = _generate(engine, [GenerationParams("a cat", num_inference_steps=7, guidance_scale=5.0, seed=2,
                                                  cache="deepcache:2", request_id="d")])
    assert (results["d"].timings.full_steps, results["d"].timings.cached_steps) == (3, 4)
    family = engine.core.runner.family
    params = GenerationParams("a cat", guidance_scale=5.0, cache="deepcache:2").resolve(engine.core.spec)
    assert family.cache_bytes(parse_cache_policy("deepcache:2"), params) > 0


def test_auto_default_is_each_familys_own(tiny_sd3_dir, tiny_sd15_dir):
    sd3 = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, default_cache="auto")
    unet = Engine.from_pretrained(tiny_sd15_dir, default_cache="auto")
    assert (sd3.core.config.default_cache, unet.core.config.default_cache) == ("adaptive", "none")
    # Without deadlines adaptive has no reason to cache: the image is the exact one.
    base = dict(num_inference_steps=6, guidance_scale=3.0, seed=5)
    auto = _generate(sd3, [GenerationParams("a red circle", request_id="a", **base)])["a"]
    exact = _generate(Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16),
                      [GenerationParams("a red circle", request_id="e", **base)])["e"]
    assert auto.params.cache == "adaptive" and auto.timings.cached_steps == 0
    assert np.array_equal(np.array(auto.image), np.array(exact.image))
    with pytest.raises(ValueError, match="does not fit"):
        Engine.from_pretrained(tiny_sd15_dir, default_cache="glideserve:2")


def test_mixed_policies_and_sizes_through_the_engine_match_each_request_alone(tiny_sd3_dir):
    """Requests with different policies and sizes, joining mid-way, give the image each gives alone."""
    requests = [
        (0, GenerationParams("a red circle", num_inference_steps=8, guidance_scale=3.0, seed=1, height=32, width=32,
                             cache="glideserve:2", request_id="g")),
        (1, GenerationParams("a blue square", num_inference_steps=7, guidance_scale=3.0, seed=2, height=16, width=32,
                             cache="fbcache:0.5", request_id="f")),
        (2, GenerationParams("a green triangle", num_inference_steps=6, guidance_scale=1.0, seed=3, height=32,
                             width=32, cache="fora:1", request_id="o")),
        (3, GenerationParams("a red circle", num_inference_steps=6, guidance_scale=3.0, seed=4, height=32, width=32,
                             cache="none", request_id="n")),
    ]
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    mixed, step, pending = {}, 0, list(requests)
    while pending or engine.has_unfinished():
        for item in [r for r in pending if r[0] <= step]:
            engine.add_request(item[1])
            pending.remove(item)
        for event in engine.step():
            if isinstance(event, GenerationResult):
                mixed[event.request_id] = event
        step += 1
    for _, params in requests:
        alone = _generate(Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16), [params])[params.request_id]
        got = mixed[params.request_id]
        assert (got.timings.full_steps, got.timings.cached_steps) == \
            (alone.timings.full_steps, alone.timings.cached_steps), params.request_id
        diff = np.abs(np.array(got.image, dtype=int) - np.array(alone.image, dtype=int)).max()
        assert diff <= 2, (params.request_id, diff)
