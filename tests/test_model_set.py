"""Which models stay resident and which steps next, decided without a model (fake cores)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from glideserve.engine.model_set import ModelSet, ModelSource
from glideserve.errors import ModelLoadError


class FakeCore:
    """What ModelSet reads of an EngineCore: work left, the last step's time, the least slack."""

    def __init__(self, step_s: float = 1.0, busy: bool = True, slack: float | None = None):
        self.busy, self.slack = busy, slack
        self.last_step = SimpleNamespace(duration_s=step_s)
        self.scheduler = SimpleNamespace(least_slack_s=lambda now: self.slack)

    def has_unfinished(self) -> bool:
        return self.busy


def _models(*names, **kwargs) -> ModelSet:
    models = ModelSet([ModelSource(n, n) for n in names], clock=lambda: 0.0, **kwargs)
    return models


def _resident(models: ModelSet, name: str, core: FakeCore, weights: int = 100, at: float = 0.0) -> None:
    slot = models.get(name)
    slot.core, slot.weights_bytes, slot.last_used = core, weights, at
    if not models.weights.claim(name, weights):
        models.weights.claim_over_budget(name, weights)


def test_model_options_parse_names_and_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert ModelSource.parse("glide-small") == ModelSource("glide-small", "glide-small")
    assert ModelSource.parse(f"tiny={folder}") == ModelSource("tiny", str(folder))
    assert ModelSource.parse(str(folder)).name == "my-model"
    assert ModelSource.parse(str(tmp_path / "sd15.safetensors")).name == "sd15"
    for bad in ("=glide-small", "tiny=", "a b=glide-small", "x" * 65 + "=glide-small"):
        with pytest.raises(ValueError):
            ModelSource.parse(bad)
    with pytest.raises(ValueError, match="given twice"):
        ModelSet([ModelSource("a", "x"), ModelSource("a", "y")])


def test_an_unknown_model_is_a_404_that_lists_the_served_ones():
    models = _models("small", "tiny")
    assert models.get(None) is models.default and models.get("tiny").name == "tiny"
    with pytest.raises(ModelLoadError) as err:
        models.get("sdxl")
    assert err.value.http_status == 404 and err.value.code == "model_not_found"
    assert "small" in err.value.message and "tiny" in err.value.message


def test_the_least_recently_used_idle_model_makes_room():
    models = _models("a", "b", "c", max_loaded=2)
    _resident(models, "a", FakeCore(busy=False), at=5.0)
    _resident(models, "b", FakeCore(busy=False), at=1.0)
    assert models.victims_for(models.get("c")) == [models.get("b")]
    models.get("b").core.busy = True  # a busy model is never unloaded: "a" goes although used later
    assert models.victims_for(models.get("c")) == [models.get("a")]
    models.get("a").core.busy = True
    assert models.victims_for(models.get("c")) is None  # wait until one goes idle


def test_the_weights_budget_unloads_as_many_as_it_takes():
    models = _models("a", "b", "big", weights_budget_bytes=250)
    _resident(models, "a", FakeCore(busy=False), weights=100, at=1.0)
    _resident(models, "b", FakeCore(busy=False), weights=100, at=2.0)
    big = models.get("big")
    big.weights_bytes = 200
    assert models.victims_for(big) == [models.get("a"), models.get("b")]
    big.weights_bytes = 50
    assert models.victims_for(big) == []
    big.weights_bytes = 1000  # larger than the budget: it still loads, alone
    assert models.victims_for(big) == [models.get("a"), models.get("b")]


def _run_steps(models: ModelSet, n: int) -> list[str]:
    order = []
    for _ in range(n):
        slot = models.next_to_step()
        order.append(slot.name)
        models.charge(slot, slot.core.last_step.duration_s)
    return order


def test_busy_models_share_step_time_fairly():
    models = _models("slow", "fast")
    _resident(models, "slow", FakeCore(step_s=1.0))
    _resident(models, "fast", FakeCore(step_s=0.25))
    order = _run_steps(models, 50)
    # Equal time, not equal steps: four 0.25 s steps for each 1 s step.
    assert abs(order.count("fast") - 4 * order.count("slow")) <= 4


def test_shares_weight_step_time():
    models = _models("light", "heavy")
    _resident(models, "light", FakeCore(step_s=1.0))
    _resident(models, "heavy", FakeCore(step_s=1.0))
    models.set_shares({"light": 1.0, "heavy": 3.0})
    order = _run_steps(models, 40)
    assert abs(order.count("heavy") - 3 * order.count("light")) <= 3
    with pytest.raises(ValueError, match="positive"):
        models.set_shares({"light": 0.0})


def test_a_model_back_from_idle_banks_no_credit():
    models = _models("a", "b")
    _resident(models, "a", FakeCore(step_s=1.0))
    _resident(models, "b", FakeCore(step_s=1.0, busy=False))
    _run_steps(models, 20)  # "a" alone for 20 s
    models.get("b").core.busy = True
    order = _run_steps(models, 10)
    assert order.count("b") <= 6  # alternates rather than running "b" for 20 steps


def test_a_request_about_to_miss_its_deadline_goes_before_fairness():
    models = _models("a", "b")
    _resident(models, "a", FakeCore(step_s=1.0, slack=10.0))
    _resident(models, "b", FakeCore(step_s=1.0, slack=0.5))
    models.get("a").vruntime, models.get("b").vruntime = 0.0, 5.0
    assert models.next_to_step().name == "b"  # waiting one 1 s step of "a" would make it late
    models.get("b").core.slack = 3.0
    assert models.next_to_step().name == "a"  # it has room: fairness decides


def test_a_first_load_larger_than_expected_unloads_idle_models_after_the_fact():
    models = _models("a", "b", "c", weights_budget_bytes=250)
    _resident(models, "a", FakeCore(busy=False), weights=100, at=1.0)
    _resident(models, "b", FakeCore(busy=False), weights=100, at=2.0)
    _resident(models, "c", FakeCore(busy=False), weights=100, at=3.0)  # its size was unknown before it loaded
    assert models.excess(keep=models.get("c")) == [models.get("a")]
    assert models.excess(keep=models.get("a")) == [models.get("b")]


def test_a_model_idle_for_a_while_comes_back_without_credit_even_when_all_were_idle():
    models = _models("a", "b")
    _resident(models, "a", FakeCore(step_s=1.0))
    _resident(models, "b", FakeCore(step_s=1.0, busy=False))
    _run_steps(models, 100)  # "a" alone
    models.get("a").core.busy = False
    assert models.next_to_step() is None  # everyone idle for a moment
    models.get("a").core.busy = models.get("b").core.busy = True
    order = _run_steps(models, 20)
    assert 8 <= order.count("a") <= 12  # "b" did not bank 100 s of credit


def test_a_request_already_late_does_not_starve_the_other_model():
    models = _models("a", "b")
    _resident(models, "a", FakeCore(step_s=1.0))
    _resident(models, "b", FakeCore(step_s=1.0, slack=-5.0))  # will miss its deadline whatever happens
    order = _run_steps(models, 20)
    assert 8 <= order.count("a") <= 12


def test_a_load_claims_its_weights_when_it_starts():
    models = _models("a", "b", "c", weights_budget_bytes=1000)
    _resident(models, "a", FakeCore(busy=True), weights=600)
    for name in ("b", "c"):
        models.get(name).weights_bytes = 400
    assert models.victims_for(models.get("b")) == []
    models.begin_load(models.get("b"), now=0.0)
    assert models.victims_for(models.get("c")) is None  # "a" is busy and "b" already holds its share
    models.load_failed(models.get("b"))
    assert models.victims_for(models.get("c")) == []


def test_unloaded_models_park_in_host_memory_least_recently_parked_dropped_first():
    clock = iter(range(100))
    models = ModelSet([ModelSource(n, n) for n in "abc"], clock=lambda: float(next(clock)), host_budget_bytes=250)
    cores = {}
    for name in "abc":
        cores[name] = FakeCore(busy=False)
        _resident(models, name, cores[name])
    assert models.unload(models.get("a")) == [] and models.get("a").parked is cores["a"]
    assert models.unload(models.get("b")) == []  # 200 of 250 bytes parked
    assert models.unload(models.get("c")) == [cores["a"]]  # a, parked first, is dropped to make room
    assert models.get("a").parked is None and models.get("c").parked is cores["c"]
    assert models.host.used == 200 and models.get("a").describe()["offloaded"] is False
    b = models.get("b")
    models.begin_load(b, 10.0)
    assert b.restoring and models.unpark(b) is cores["b"] and models.host.used == 100
    b.load_s = 30.0  # a load from disk takes 30 s; the first copy back is expected to take as long
    assert b.load_remaining_s(10.0) == 30.0


def test_a_copy_back_learns_its_own_time_apart_from_loads_from_disk():
    models = ModelSet([ModelSource("a", "a")], clock=lambda: 0.0, host_budget_bytes=1000)
    slot = models.get("a")
    core = SimpleNamespace(spec=None, scheduler=SimpleNamespace(profile=None, policy=SimpleNamespace(
        deadline_aware=False)), config=None, runner=SimpleNamespace(samplers=None, compiled=None), weights_bytes=100)
    models.begin_load(slot, 0.0)
    models.installed(slot, core, 20.0)  # from disk
    models.unload(slot)
    assert slot.load_remaining_s(0.0) == 20.0  # no copy back measured yet
    models.begin_load(slot, 0.0)
    models.unpark(slot)
    models.installed(slot, core, 0.5)  # from host memory
    assert slot.load_s == 20.0 and slot.restore_s == 0.5 and slot.restores == 1
    models.unload(slot)
    assert slot.load_remaining_s(0.0) == 0.5
