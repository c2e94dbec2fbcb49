"""Resolve a model name or path and load it as a diffusers pipeline (components only).

Accepted: a bundled model name (``glide-small``, ``glide-tiny``, ``glide-base``), a local diffusers
folder (``from_pretrained``), or a single checkpoint file (``from_single_file``).
The pipeline object is only a container of components here: the engine drives the
denoiser, scheduler and VAE itself and never calls ``Pipeline.__call__``.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

import torch

from glideserve.errors import ModelLoadError
from glideserve.models.spec import ModelSpec
from glideserve.runner.families.registry import family_for_pipeline_class

BUNDLED_MODELS = ("glide-small", "glide-tiny", "glide-base", "glide-turbo")
SERVING_DEFAULTS_FILE = "serving.json"
log = logging.getLogger(__name__)


def bundled_model_dir(name: str) -> Path:
    """Folder of a model shipped inside the package."""
    return Path(str(resources.files("glideserve") / "data" / "models" / name))


def resolve_model_path(name_or_path: str) -> Path:
    """Map a bundled name or a user path to an existing file or folder, or explain what is wrong."""
    if name_or_path in BUNDLED_MODELS:
        folder = bundled_model_dir(name_or_path)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"the bundled model {name_or_path!r} is missing from this install; "
                f"rebuild it with `glideserve train-toy --size {name_or_path.split('-')[1]}`", "model")
        return folder
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name_or_path!r} not found: pass a diffusers folder, a .safetensors file or one of "
            f"{', '.join(BUNDLED_MODELS)}", "model")
    return path


def quiet_library_logging() -> None:
    """Silence per-file loading bars and advisory warnings of diffusers/transformers.

    Set GLIDESERVE_VERBOSE=1 to keep them (useful when a checkpoint fails to load).
    """
    if os.environ.get("GLIDESERVE_VERBOSE"):
        return
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_pipeline(name_or_path: str, *, torch_dtype: torch.dtype = torch.float32,
                  single_file_config: str | None = None, allow_unsafe_pickle: bool = False):
    """Load the pipeline's components from a bundled name, folder or checkpoint file."""
    path = resolve_model_path(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a serving process must never reach for a hub
    quiet_library_logging()
    if path.is_file():
        from glideserve.models import single_file

        single_file.check_checkpoint_file(path, allow_unsafe_pickle)
        return single_file.load_single_file(path, config=single_file_config, torch_dtype=torch_dtype,
                                            allow_unsafe_pickle=allow_unsafe_pickle)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)", "model")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{index} is not a valid model_index.json: {exc}", "model") from exc
    family_for_pipeline_class(class_name, str(path))
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    try:
        # use_safetensors=True refuses pickled weights in a folder, like the single-file path does.
        return pipeline_cls.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                            local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"could not load {path} as {class_name}: {exc}", "model") from exc


def serving_defaults(name_or_path: str) -> dict:
    """Optional ``serving.json`` of a model folder: default steps, guidance, T5 length."""
    path = resolve_model_path(name_or_path)
    file = path / SERVING_DEFAULTS_FILE if path.is_dir() else None
    if file is None or not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}", "model") from exc
    allowed = {"default_steps", "default_guidance", "max_sequence_length", "default_size"}
    return {k: v for k, v in data.items() if k in allowed}


def pipeline_family(pipe) -> str:
    return family_for_pipeline_class(type(pipe).__name__, "the pipeline").name


def spec_from_pipeline(pipe, name: str, defaults: dict | None = None) -> ModelSpec:
    """Derive the facts validation and scheduling need from a loaded pipeline's configs."""
    from glideserve.runner.samplers import sampler_names

    defaults = defaults or {}
    family = family_for_pipeline_class(type(pipe).__name__, "the pipeline")
    denoiser = family.denoiser_of(pipe)
    family.check_denoiser(denoiser)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = denoiser.config.sample_size * vae_factor
    if "default_size" in defaults:
        side = int(defaults["default_size"])
    names = sampler_names(family.flow_matching)
    return ModelSpec(
        name=name, family=family.name, latent_channels=denoiser.config.in_channels, vae_scale_factor=vae_factor,
        patch_size=family.patch_size(denoiser), default_height=side, default_width=side,
        default_steps=int(defaults.get("default_steps", family.default_steps)),
        default_guidance=float(defaults.get("default_guidance", family.default_guidance)),
        samplers=names, default_sampler=_default_sampler(pipe, names), max_prompt_tokens=pipe.tokenizer.model_max_length,
        max_side=family.max_side(denoiser, vae_factor), cache_policies=family.supported_cache_policies(denoiser),
        flow_matching=family.flow_matching,
    )


def _default_sampler(pipe, names: tuple[str, ...]) -> str:
    from glideserve.runner.samplers import name_of_scheduler

    own = name_of_scheduler(pipe.scheduler)
    if own in names:  # the pipeline's own scheduler keeps results identical to the pipeline
        return own
    log.warning("the model's scheduler %s is not one glideserve drives per request; requests default to "
                "the %r sampler (choose another per request with `sampler`)", type(pipe.scheduler).__name__, names[0])
    return names[0]


def pipeline_weight_bytes(pipe) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules (what unloading it frees)."""
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:  # tied weights count once
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total
