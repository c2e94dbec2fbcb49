"""Single-file checkpoints in the original layout load offline into the pipeline they were made from.

Each small pipeline is written as one ``.safetensors`` file with original (LDM / Stability)
key names; the ``--config`` folder is a *different* random pipeline of the same
architecture, so matching weights prove they came from the file, not from the folder.
"""

from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest_single_file_helpers import (build_sd3_for_original_layout, build_sdxl_for_original_layout,
                                          pipeline_to_original, save_original_checkpoint)
from glideserve.errors import ModelLoadError
from glideserve.models.build import UNetDims, build_unet_pipeline
from glideserve.models.single_file import check_checkpoint_file, load_single_file, read_safetensors_family

BUILDERS = {
    "sd15": lambda seed: build_unet_pipeline(UNetDims(), seed),
    "sd3": build_sd3_for_original_layout,
    "sdxl": build_sdxl_for_original_layout,
}
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline",
                    "sdxl": "StableDiffusionXLPipeline"}
DENOISER = {"sd15": "unet", "sd3": "transformer", "sdxl": "unet"}


class Exported:
    """A pipeline, its original-layout file, and a config folder holding other weights of the same shapes."""

    def __init__(self, family: str, root):
        self.pipe = BUILDERS[family](0)
        other = BUILDERS[family](1)
        # Tokenizers never travel in a checkpoint: they come from the config folder, so it
        # carries the original's (the offline BPE trainer does not give identical vocabularies twice).
        tokenizers = {k: v for k, v in self.pipe.components.items() if k.startswith("tokenizer")}
        self.config_pipe = type(other)(**{**other.components, **tokenizers})
        self.config = root / "config"
        self.config_pipe.save_pretrained(self.config)
        self.file = save_original_checkpoint(self.pipe, root / "model.safetensors")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in made:
            made[family] = Exported(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during single-file loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def differing_tensors(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return sorted(set(sa) ^ set(sb))
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def generate(pipe, family: str) -> np.ndarray:
    kwargs = {"max_sequence_length": 32} if family == "sd3" else {}
    out = pipe("a red circle", negative_prompt="blue", num_inference_steps=2, guidance_scale=3.0,
               height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs)
    return out.images


@pytest.mark.parametrize("family", ["sd15", "sd3", "sdxl"])
def test_family_is_detected_from_the_header(exported, family):
    assert read_safetensors_family(exported(family).file) == family


@pytest.mark.parametrize("family", ["sd15", "sd3", "sdxl"])
def test_round_trip_gives_the_same_weights_and_image(exported, no_network, family):
    ex = exported(family)
    loaded = load_single_file(ex.file, config=str(ex.config), torch_dtype=torch.float32)

    assert type(loaded).__name__ == PIPELINE_CLASSES[family]
    assert modules(loaded).keys() == modules(ex.pipe).keys()
    for name, module in modules(ex.pipe).items():
        assert differing_tensors(module, loaded.components[name]) == [], name
    # The folder's own weights differ, so the equality above could only come from the file.
    assert differing_tensors(ex.config_pipe.components[DENOISER[family]], loaded.components[DENOISER[family]])

    expected, got = generate(ex.pipe, family), generate(loaded, family)
    assert expected.shape == (1, 32, 32, 3)
    assert np.abs(expected - got).max() <= 1e-5


@pytest.mark.parametrize(("family", "leave_out", "from_folder"), [
    ("sd15", ("first_stage_model.",), ["vae"]),
    ("sd3", ("text_encoders.",), ["text_encoder", "text_encoder_2", "text_encoder_3"]),
    ("sd3", ("text_encoders.t5xxl.",), ["text_encoder_3"]),
    ("sdxl", ("conditioner.", "first_stage_model."), ["text_encoder", "text_encoder_2", "vae"]),
])
def test_parts_the_checkpoint_lacks_come_from_the_config_folder(exported, no_network, tmp_path, family, leave_out,
                                                                from_folder):
    ex = exported(family)
    file = save_original_checkpoint(ex.pipe, tmp_path / "partial.safetensors", leave_out=leave_out)
    loaded = load_single_file(file, config=ex.config, torch_dtype=torch.float32)
    for name in modules(ex.pipe):
        source = ex.config_pipe if name in from_folder else ex.pipe
        assert differing_tensors(source.components[name], loaded.components[name]) == [], name


def test_part_missing_from_both_file_and_config_folder_is_refused(exported, tmp_path):
    ex = exported("sd3")
    config = tmp_path / "config"
    shutil.copytree(ex.config, config)
    (config / "text_encoder_3" / "model.safetensors").unlink()
    file = save_original_checkpoint(ex.pipe, tmp_path / "no_t5.safetensors", leave_out=("text_encoders.t5xxl.",))
    with pytest.raises(ModelLoadError, match="holds no text_encoder_3 weights"):
        load_single_file(file, config=config, torch_dtype=torch.float32)


def test_half_precision_is_applied_to_every_component(exported):
    ex = exported("sd15")
    loaded = load_single_file(ex.file, config=ex.config, torch_dtype=torch.bfloat16)
    assert {p.dtype for m in modules(loaded).values() for p in m.parameters()} == {torch.bfloat16}


def test_family_argument_overrides_detection(exported):
    ex = exported("sd15")
    loaded = load_single_file(ex.file, config=ex.config, torch_dtype=torch.float32, family="sd15")
    assert differing_tensors(ex.pipe.unet, loaded.unet) == []
    with pytest.raises(ModelLoadError, match="holds a StableDiffusionPipeline"):
        load_single_file(ex.file, config=ex.config, torch_dtype=torch.float32, family="sdxl")
    with pytest.raises(ModelLoadError, match="unknown family 'flux'"):
        load_single_file(ex.file, config=ex.config, torch_dtype=torch.float32, family="flux")


def test_missing_config_tells_the_user_to_pass_one(exported):
    with pytest.raises(ModelLoadError, match="--config PATH_TO_DIFFUSERS_FOLDER") as info:
        load_single_file(exported("sd3").file, config=None, torch_dtype=torch.float32)
    assert "stable-diffusion-3" in info.value.message


def test_config_that_is_not_a_diffusers_folder_is_refused(exported, tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_single_file(exported("sd15").file, config=tmp_path, torch_dtype=torch.float32)


def test_config_of_another_family_is_refused(exported):
    with pytest.raises(ModelLoadError, match="SD1.x / SD2.x model but --config .* holds a StableDiffusionXLPipeline"):
        load_single_file(exported("sd15").file, config=exported("sdxl").config, torch_dtype=torch.float32)


def test_config_of_other_widths_is_refused(exported, tmp_path):
    build_unet_pipeline(UNetDims(channels=(8, 32))).save_pretrained(tmp_path / "wider")
    with pytest.raises(ModelLoadError, match="same architecture"):
        load_single_file(exported("sd15").file, config=tmp_path / "wider", torch_dtype=torch.float32)


@pytest.mark.parametrize(("family", "dropped_prefix"), [
    ("sd15", "model.diffusion_model.output_blocks.1."),
    ("sd3", "text_encoders.t5xxl.transformer.encoder.final_layer_norm."),
])
def test_checkpoint_lacking_weights_is_refused(exported, tmp_path, family, dropped_prefix):
    ex = exported(family)
    tensors = load_file(str(ex.file))
    file = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped_prefix)}, str(file))
    with pytest.raises(ModelLoadError, match="does not fill every weight"):
        load_single_file(file, config=ex.config, torch_dtype=torch.float32)


def test_file_that_is_not_safetensors_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_text("<html>404 not found</html>")
    with pytest.raises(ModelLoadError, match="not a readable safetensors checkpoint"):
        load_single_file(file, config=None, torch_dtype=torch.float32)


def test_safetensors_without_a_known_model_is_refused(tmp_path):
    file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(file))
    with pytest.raises(ModelLoadError, match="cannot tell which model"):
        load_single_file(file, config=None, torch_dtype=torch.float32)


def test_single_diffusers_component_gets_a_hint(exported):
    unet_file = exported("sd15").config / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelLoadError, match="pass the whole diffusers folder"):
        load_single_file(unet_file, config=None, torch_dtype=torch.float32)


def test_inpainting_checkpoint_is_refused(exported, tmp_path):
    tensors = load_file(str(exported("sd15").file))
    conv_in = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 9, *conv_in.shape[2:])
    file = tmp_path / "inpaint.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(ModelLoadError, match="'inpainting' model"):
        read_safetensors_family(file)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused_without_the_flag(exported, tmp_path, suffix):
    file = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, file)
    with pytest.raises(ModelLoadError, match="--allow-unsafe-pickle") as info:
        check_checkpoint_file(file, allow_unsafe_pickle=False)
    assert "arbitrary code" in info.value.message
    with pytest.raises(ModelLoadError, match="--allow-unsafe-pickle"):
        load_single_file(file, config=exported("sd15").config, torch_dtype=torch.float32)


def test_pickle_checkpoint_loads_with_the_flag(exported, tmp_path):
    ex = exported("sd15")
    file = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_original(ex.pipe)}, file)  # the usual Lightning nesting
    check_checkpoint_file(file, allow_unsafe_pickle=True)
    loaded = load_single_file(file, config=ex.config, torch_dtype=torch.float32, allow_unsafe_pickle=True)
    for name, module in modules(ex.pipe).items():
        assert differing_tensors(module, loaded.components[name]) == [], name


def test_other_files_and_missing_files_are_refused(tmp_path):
    notes = tmp_path / "model.txt"
    notes.write_text("weights")
    with pytest.raises(ModelLoadError, match="expected a diffusers folder or a file ending in .safetensors"):
        check_checkpoint_file(notes)
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_checkpoint_file(tmp_path / "absent.safetensors")
