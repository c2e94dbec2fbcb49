"""The LoRA trainer on a served model: shared weights, serving untouched, deterministic resume, a servable file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from glideserve.config import EngineConfig  # noqa: E402
from glideserve.engine.core import EngineCore  # noqa: E402
from glideserve.finetune.dataset import read_pairs  # noqa: E402
from glideserve.finetune.trainer import FineTuneConfig, LoRATrainer  # noqa: E402
from glideserve.models.loading import resolve_model_path  # noqa: E402
from glideserve.runner.lora_files import read_lora_file  # noqa: E402
from glideserve.toy.concept import write_concept_dataset  # noqa: E402


@pytest.fixture(scope="module")
def family():
    config = EngineConfig.from_kwargs(profile=False, lora_dir=None)
    return EngineCore.from_pretrained(str(resolve_model_path("glide-tiny")), config, name="glide-tiny").runner.family


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return read_pairs(write_concept_dataset(tmp_path_factory.mktemp("data") / "pink", "pink", 24, seed=1))


def _config(**overrides) -> FineTuneConfig:
    return FineTuneConfig(**{"model": "glide-tiny", "dataset": "pink", "adapter_name": "pink", "rank": 4,
                             "steps": 6, "batch_size": 2, "learning_rate": 1e-2, "seed": 3, **overrides})


def _weights(trainer: LoRATrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.lora}


def test_training_shares_the_base_weights_and_leaves_serving_alone(family, pairs):
    base = family.denoiser_of(family.pipe)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    trainer = LoRATrainer(family, _config(), pairs)
    shared = {id(p) for p in base.parameters()}
    assert all(id(p) in shared for name, p in trainer.denoiser.named_parameters() if "lora_" not in name)
    losses = [trainer.step() for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not any("lora_" in name for name, _ in base.named_parameters())  # the serving tree has no adapter
    for name, p in base.named_parameters():
        assert torch.equal(p, before[name]), name  # base weights frozen
    assert any(p.abs().sum() > 0 for name, p in trainer.lora if "lora_B" in name)  # the adapter learned


def test_a_job_stopped_and_resumed_from_its_checkpoint_ends_with_the_same_weights(family, pairs, tmp_path):
    straight = LoRATrainer(family, _config(), pairs)
    for _ in range(6):
        straight.step()
    first = LoRATrainer(family, _config(), pairs)
    for _ in range(3):
        first.step()
    first.save_checkpoint(tmp_path / "ckpt.safetensors")
    first.step()  # progress after the checkpoint is lost with the "crash"
    resumed = LoRATrainer(family, _config(), pairs)
    resumed.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert resumed.state.step == 3
    while not resumed.done:
        resumed.step()
    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.state.losses == straight.state.losses


def test_a_checkpoint_of_another_job_is_refused(family, pairs, tmp_path):
    trainer = LoRATrainer(family, _config(), pairs)
    trainer.step()
    trainer.save_checkpoint(tmp_path / "ckpt.safetensors")
    other = LoRATrainer(family, _config(learning_rate=5e-3), pairs)
    with pytest.raises(ValueError, match="another job"):
        other.load_checkpoint(tmp_path / "ckpt.safetensors")


def test_the_exported_adapter_reads_as_a_served_lora(family, pairs, tmp_path):
    trainer = LoRATrainer(family, _config(alpha=8.0), pairs)
    trainer.step()
    trainer.export(tmp_path / "pink.safetensors")
    adapter = read_lora_file(tmp_path / "pink.safetensors", "pink", family.denoiser_prefix, family.pipeline_class,
                             torch.float32, torch.device("cpu"))
    assert adapter.rank == 4
    assert all(scale == 2.0 for _, _, scale in adapter.layers.values())  # alpha 8 / rank 4
    assert {m.rpartition(".")[2] for m in adapter.layers} | {"0"} >= {"to_q", "to_k", "to_v"}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_sd15_unet_trains_with_its_own_prediction_type(tiny_sd15_dir, pairs, tmp_path, prediction):
    unet_core = EngineCore.from_pretrained(tiny_sd15_dir, EngineConfig.from_kwargs(profile=False), name="sd15")
    unet_family = unet_core.runner.family
    unet_family.pipe.scheduler.register_to_config(prediction_type=prediction)
    trainer = LoRATrainer(unet_family, _config(model="sd15", target_modules=("to_q", "to_v")), pairs)
    assert trainer.ddpm.config.prediction_type == prediction
    losses = [trainer.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    trainer.export(tmp_path / "u.safetensors")
    adapter = read_lora_file(tmp_path / "u.safetensors", "u", "unet", unet_family.pipeline_class, torch.float32,
                             torch.device("cpu"))
    assert adapter.layers and all(m.endswith(("to_q", "to_v")) for m in adapter.layers)
