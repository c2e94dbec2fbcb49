"""The fine-tuning service without HTTP: restart resumes a job to the same adapter; the deadline gate."""

from __future__ import annotations

import math
import types

import pytest
import torch

pytest.importorskip("peft")

from glideserve.config import EngineConfig  # noqa: E402
from glideserve.engine.core import EngineCore  # noqa: E402
from glideserve.engine.model_set import ModelSet, ModelSource  # noqa: E402
from glideserve.finetune.dataset import read_pairs  # noqa: E402
from glideserve.finetune.service import SAFETY, FineTuningService  # noqa: E402
from glideserve.finetune.trainer import FineTuneConfig, LoRATrainer  # noqa: E402
from glideserve.models.loading import resolve_model_path  # noqa: E402
from glideserve.toy.concept import write_concept_dataset  # noqa: E402


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    config = EngineConfig.from_kwargs(profile=False, lora_dir=str(loras))
    return EngineCore.from_pretrained(str(resolve_model_path("glide-tiny")), config, name="glide-tiny")


def _service(data_dir, core) -> FineTuningService:
    runner = core.runner
    return FineTuningService(data_dir, {"glide-tiny": lambda: (runner.family, runner.loras, core.scheduler.memory)})


def test_a_restarted_service_resumes_the_job_to_the_same_adapter(tmp_path, core):
    from safetensors.torch import load_file

    data = tmp_path / "data"
    write_concept_dataset(data / "pink", "pink", 12, seed=4)
    config = FineTuneConfig("glide-tiny", "pink", "resumed", rank=4, steps=8, batch_size=2, learning_rate=1e-2,
                            seed=5, checkpoint_every=3)
    first = _service(data, core)
    job = first.create(config)
    for _ in range(5):  # steps 1-5; the checkpoint at step 3, then the server stops and checkpoints at 5
        assert first.run_micro_step()
    first.checkpoint_now()
    second = _service(data, core)  # the restarted server: same folders
    assert second.jobs[job.id].status == "queued"
    while second.wants_step():
        second.run_micro_step()
    assert second.jobs[job.id].status == "succeeded"
    straight = LoRATrainer(core.runner.family, config, read_pairs(data / "pink"))
    while not straight.done:
        straight.step()
    got = load_file(str(core.runner.loras.directory / "resumed.safetensors"))
    expected = straight.adapter_tensors()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not core.scheduler.memory.holds(f"finetune:{job.id}")  # the claim is released at the end


def test_a_micro_step_runs_only_where_twice_its_time_fits_in_the_least_slack(tmp_path, core):
    service = _service(tmp_path, core)
    assert service.may_run(math.inf) and not service.may_run(0.0)
    service._step_s = 0.05
    assert service.may_run(SAFETY * 0.05) and not service.may_run(SAFETY * 0.05 - 1e-6)


def _slot(name, least_slack=None, best_effort=False, unfinished=True, pending=()):
    scheduler = types.SimpleNamespace(least_slack_s=lambda now, keep_margin=False: least_slack,
                                      has_best_effort=lambda: best_effort)
    core = types.SimpleNamespace(scheduler=scheduler, has_unfinished=lambda: unfinished)
    return types.SimpleNamespace(name=name, core=core, pending=list(pending))


def test_the_least_slack_covers_every_model_and_lends_nothing_to_best_effort_work():
    models = ModelSet([ModelSource.parse("a=x"), ModelSource.parse("b=y")])
    models.slots = [_slot("a", 0.8), _slot("b", 0.3)]
    assert models.least_slack_s(0.0) == 0.3
    models.slots = [_slot("a", 0.8), _slot("b", 0.3, unfinished=False)]
    assert models.least_slack_s(0.0) == 0.8
    models.slots = [_slot("a", 0.8), _slot("b", None, best_effort=True)]
    assert models.least_slack_s(0.0) == 0.0
    models.slots = [_slot("a", 0.8, pending=["waiting for a load"])]
    assert models.least_slack_s(0.0) == 0.0
    models.slots = [_slot("a", unfinished=False)]
    assert models.least_slack_s(0.0) == math.inf


def test_time_spent_training_is_left_out_of_the_step_time_the_profile_learns(core):
    core._busy_cycle = (100.0, "result")
    core.exclude_from_cycle(0.25)
    assert core._busy_cycle == (100.25, "result")
    core._busy_cycle = None
    core.exclude_from_cycle(0.25)  # idle: nothing to adjust
    assert core._busy_cycle is None
