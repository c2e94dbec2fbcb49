"""Load a single-file checkpoint in the original (LDM / Stability) layout, offline.

Community checkpoints are mostly shipped as one ``.safetensors`` file holding the
denoiser, the VAE and usually the text encoders under their original names
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
``conditioner.embedders.*``, ``text_encoders.*``). diffusers' ``from_single_file``
converts those names, but it needs the component configs and tokenizers of a
diffusers folder of the same architecture; without network access that folder must
be given explicitly (``--config``), so this module never lets diffusers reach for a hub.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from glideserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

FAMILY_PIPELINES = {
    "sd3": "StableDiffusion3Pipeline",
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
_FAMILY_NAMES = {"sd3": "SD3 / SD3.5", "sd15": "SD1.x / SD2.x", "sdxl": "SDXL base"}
# diffusers' names (infer_diffusers_model_type) for the checkpoint types we serve.
_SERVED_DIFFUSERS_TYPES = frozenset({"sd3", "sd35_medium", "sd35_large", "v1", "v2", "xl_base", "playground-v2-5"})
# Diffusers folders of the reference architectures, named in messages so users know
# which folder to pass as --config.
_REFERENCE_FOLDERS = {
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers (SD3), stabilityai/stable-diffusion-3.5-medium "
           "or stabilityai/stable-diffusion-3.5-large (SD3.5)",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5 (SD1.x) or stabilityai/stable-diffusion-2-1 (SD2.x)",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
_VAE_PREFIXES = ("first_stage_model.", "vae.")
# Where each component's weights live in an original-layout file.
_COMPONENT_PREFIXES = {
    "sd3": {"text_encoder": ("text_encoders.clip_l.",), "text_encoder_2": ("text_encoders.clip_g.",),
            "text_encoder_3": ("text_encoders.t5xxl.",), "vae": _VAE_PREFIXES},
    "sd15": {"text_encoder": ("cond_stage_model.",), "vae": _VAE_PREFIXES},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.",), "text_encoder_2": ("conditioner.embedders.1.",),
             "vae": _VAE_PREFIXES},
}
SUPPORTED_TEXT = (
    "glideserve loads single-file checkpoints of "
    + ", ".join(f"{name} (--family {family})" for family, name in _FAMILY_NAMES.items())
    + " in the original layout (keys model.diffusion_model.*, first_stage_model.*, ...)"
)


def check_checkpoint_file(path: Path, allow_unsafe_pickle: bool = False) -> None:
    """Refuse a file that is not a checkpoint we load, or a pickle when not explicitly allowed.

    Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are read with ``torch.load``;
    unpickling runs code chosen by whoever made the file, so they load only with
    ``allow_unsafe_pickle=True`` (the ``--allow-unsafe-pickle`` flag).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist", "model")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_unsafe_pickle:
            raise ModelLoadError(
                f"{path.name} is a pickle checkpoint: loading it runs torch.load, and a crafted pickle file can "
                "run arbitrary code on this machine (torch's weights-only unpickler narrows but does not remove "
                "that risk). Prefer a .safetensors copy of the model. If you trust where this file comes from, "
                "pass --allow-unsafe-pickle to load it anyway.", "model")
        return
    if suffix not in SAFE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is not a checkpoint file glideserve reads: expected a diffusers folder or a file ending "
            f"in {', '.join(CHECKPOINT_SUFFIXES)}", "model")


class _LazyCheckpoint(Mapping):
    """Read-only view of a safetensors file: keys come from the header, a tensor is read only when asked for."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _structural_family(keys: Mapping) -> str | None:
    """Family from which parts the checkpoint holds; unlike diffusers' detector it does not
    depend on the real models' widths and depths, so fine-tunes and small models resolve too."""
    if any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys):
        return "sd3"
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        return None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return None  # only one embedder: the SDXL refiner, an image-to-image model
    if "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "sdxl"  # SDXL's size conditioning, in a file shipped without its text encoders
    return "sd15"


def detect_family(checkpoint: Mapping) -> str:
    """Family ("sd3", "sd15" or "sdxl") of an original-layout checkpoint, or a ModelLoadError."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    # diffusers' detector names variants we refuse (inpainting, refiner, ControlNet, other
    # architectures); the structural check below decides the family, because diffusers keys
    # on the real models' sizes and answers "v1" whenever nothing matched.
    try:
        model_type = infer_diffusers_model_type(checkpoint)
    except (KeyError, ValueError, IndexError, UnboundLocalError):
        # It indexes keys that partial files lack, and leaves its answer unset for SD3 sizes
        # it does not know; the structural check still applies.
        model_type = None
    if model_type is not None and model_type not in _SERVED_DIFFUSERS_TYPES:
        raise ModelLoadError(
            f"this checkpoint looks like a {model_type!r} model, which glideserve does not serve (it serves "
            "text-to-image base models). " + SUPPORTED_TEXT, "model")
    family = _structural_family(checkpoint)
    if family is None:
        hint = ""
        if any(k.startswith(("down_blocks.", "transformer_blocks.", "encoder.down_blocks.")) for k in checkpoint):
            hint = (" Its keys are in diffusers' naming: it is one component of a diffusers model, so pass the "
                    "whole diffusers folder instead.")
        raise ModelLoadError("cannot tell which model this checkpoint holds. " + SUPPORTED_TEXT + "." + hint,
                             "model")
    return family


def _read_safetensors(path: Path, detect: bool) -> tuple[frozenset[str], str | None]:
    """Keys of a safetensors file from its header (no weights are read), and its family if asked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            checkpoint = _LazyCheckpoint(handle)
            if len(checkpoint) == 0:
                raise ModelLoadError(f"{path.name} holds no tensors: it is not a model checkpoint", "model")
            return frozenset(checkpoint), detect_family(checkpoint) if detect else None
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise ModelLoadError(
            f"{path.name} is not a readable safetensors checkpoint ({exc}). Check that the download finished "
            "and that the file is a model checkpoint, not a web page or an archive.", "model") from exc


def read_safetensors_family(path: Path) -> str:
    """Family ("sd3", "sd15" or "sdxl") of a safetensors checkpoint, read from its header alone."""
    return _read_safetensors(Path(path), detect=True)[1]


def _read_pickle(path: Path, detect: bool) -> tuple[frozenset[str], str | None]:
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # torch.load raises many types for files it cannot unpickle
        raise ModelLoadError(
            f"could not read the pickle checkpoint {path.name} with torch's weights-only loader ({exc}). "
            "Convert it to .safetensors in an environment you trust and load that file.", "model") from exc
    return frozenset(checkpoint), detect_family(checkpoint) if detect else None


def _config_folder(config: str | Path | None, family: str, path: Path) -> tuple[Path, dict]:
    """The --config folder and its model_index.json, checked against the checkpoint's family."""
    if config is None:
        raise ModelLoadError(
            f"loading the single-file checkpoint {path.name} offline needs the component configs and tokenizers of "
            f"a diffusers folder of the same architecture ({_FAMILY_NAMES[family]}): pass --config "
            f"PATH_TO_DIFFUSERS_FOLDER, for example a local copy of {_REFERENCE_FOLDERS[family]}. The folder's "
            "weights are used only for parts the checkpoint does not hold.", "config")
    folder = Path(config).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"--config {folder} is not a diffusers model folder (no model_index.json): pass the folder of a "
            f"{_FAMILY_NAMES[family]} model in diffusers layout, such as {_REFERENCE_FOLDERS[family]}", "config")
    try:
        index = json.loads(index_file.read_text())
        class_name = index["_class_name"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{index_file} is not a valid model_index.json: {exc}", "config") from exc
    if class_name != FAMILY_PIPELINES[family]:
        raise ModelLoadError(
            f"the checkpoint {path.name} is a {_FAMILY_NAMES[family]} model but --config {folder} holds a "
            f"{class_name}: pass a diffusers folder of a {FAMILY_PIPELINES[family]} instead (or --family if the "
            "checkpoint was detected wrongly)", "config")
    return folder, index


def _components_missing_from_file(keys: frozenset[str], family: str, folder: Path, index: dict,
                                  torch_dtype: torch.dtype, path: Path) -> dict:
    """Components the checkpoint lacks, loaded from the config folder.

    Many checkpoints leave out the text encoders (SD3 Medium, SD3.5) or the VAE. diffusers
    does not fall back to the folder for a VAE, and its fallback for text encoders looks
    for diffusers' weight file names, which transformers folders never have.
    """
    import importlib

    loaded = {}
    for name, prefixes in _COMPONENT_PREFIXES[family].items():
        entry = index.get(name)
        if any(k.startswith(prefixes) for k in keys) or not entry or entry[0] is None:
            continue  # in the file, or absent from the folder too (diffusers then leaves it out or says so)
        library, class_name = entry
        component_cls = getattr(importlib.import_module(library), class_name)
        dtype_kwarg = {"dtype": torch_dtype} if library == "transformers" else {"torch_dtype": torch_dtype}
        try:
            # use_safetensors: the config folder must not become a way to load pickled weights.
            loaded[name] = component_cls.from_pretrained(folder, subfolder=name, local_files_only=True,
                                                         use_safetensors=True, **dtype_kwarg)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{path.name} holds no {name} weights and they could not be loaded from --config {folder / name} "
                f"({_first_sentence(exc)}): use a config folder that includes the {name} weights", "config") from exc
        logger.info("%s holds no %s weights; using those of %s", path.name, name, folder / name)
    return loaded


def _unloaded_parameters(pipe) -> dict[str, list[str]]:
    """Parameters still on the meta device: the checkpoint had no weights for them."""
    missing = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            names = [n for n, p in component.named_parameters() if p.device.type == "meta"]
            if names:
                missing[name] = names
    return missing


def _first_sentence(exc: Exception) -> str:
    # diffusers appends advice about its own keyword arguments that a glideserve user cannot pass.
    return str(exc).split(". ")[0].strip().rstrip(".")


def load_single_file(path: Path, *, config: str | Path | None, torch_dtype: torch.dtype = torch.float32,
                     family: str | None = None, allow_unsafe_pickle: bool = False):
    """Load an original-layout checkpoint file as a diffusers pipeline, without network access.

    ``config`` is a local diffusers folder of the same architecture; it supplies the
    component configs, the tokenizers and the scheduler, and the weights of any text
    encoder or VAE the file does not hold. ``family`` ("sd3", "sd15", "sdxl") overrides
    detection from the checkpoint keys.
    """
    path = Path(path)
    check_checkpoint_file(path, allow_unsafe_pickle)
    if family is not None and family not in FAMILY_PIPELINES:
        raise ModelLoadError(f"unknown family {family!r}: use one of {', '.join(FAMILY_PIPELINES)}", "family")
    read = _read_safetensors if path.suffix.lower() in SAFE_SUFFIXES else _read_pickle
    keys, detected = read(path, detect=family is None)
    family = family or detected
    folder, index = _config_folder(config, family, path)

    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    pipeline_cls = getattr(diffusers, FAMILY_PIPELINES[family])
    overrides = _components_missing_from_file(keys, family, folder, index, torch_dtype, path)
    try:
        pipe = pipeline_cls.from_single_file(str(path), config=str(folder), torch_dtype=torch_dtype,
                                             local_files_only=True, **overrides)
    except SingleFileComponentError as exc:
        raise ModelLoadError(
            f"{path.name} lacks the weights of a component glideserve cannot take from --config {folder}: "
            f"{exc.message.splitlines()[0]} Use a complete checkpoint.", "model") from exc
    except RuntimeError as exc:
        if "meta tensor" not in str(exc):
            raise
        # A weight the checkpoint did not provide is left on the meta device and the dtype cast fails.
        raise ModelLoadError(_incomplete_message(path, folder, "some weights"), "config") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load {path.name} as a {_FAMILY_NAMES[family]} checkpoint with the configs of {folder}: "
            f"{_first_sentence(exc)}. Check that --config is a diffusers folder of the same architecture (same "
            "widths and depths) and, if the family was detected wrongly, pass --family.", "model") from exc
    missing = _unloaded_parameters(pipe)
    if missing:
        detail = "; ".join(f"{name}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for name, names in missing.items())
        raise ModelLoadError(_incomplete_message(path, folder, detail), "config")
    return pipe


def _incomplete_message(path: Path, folder: Path, detail: str) -> str:
    return (f"{path.name} does not fill every weight of the architecture in --config {folder} ({detail}): either "
            "the file is incomplete or it is a different architecture than the config folder; pass a --config "
            "folder of the checkpoint's exact architecture.")
