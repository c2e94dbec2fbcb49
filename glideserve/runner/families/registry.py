"""One registered class per model family, as a model registry does.

Each ``DenoiserFamily`` subclass declares the diffusers pipeline class it serves,
its defaults, whether it is flow matching, the cache policies its block loop
implements and how to build itself; everything that differs between families is
looked up here instead of branching on a family name.
"""

from __future__ import annotations

from glideserve.errors import ModelLoadError
from glideserve.runner.families.base import DenoiserFamily

FAMILIES: dict[str, type[DenoiserFamily]] = {}


def register_family(cls: type[DenoiserFamily]) -> type[DenoiserFamily]:
    """Class decorator: make ``cls`` the family called ``cls.name``."""
    if cls.name in FAMILIES:
        raise ValueError(f"model family {cls.name!r} is registered twice")
    FAMILIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from glideserve.runner.families import sd3, unet  # noqa: F401  (their classes register themselves)


def family_class(name: str) -> type[DenoiserFamily]:
    """The family registered as ``name``."""
    _load_builtin()
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def served_pipelines() -> dict[str, type[DenoiserFamily]]:
    """Diffusers pipeline class name -> the family that serves it."""
    _load_builtin()
    return {cls.pipeline_class: cls for cls in FAMILIES.values()}


def family_for_pipeline_class(class_name: str, where: str = "the model") -> type[DenoiserFamily]:
    served = served_pipelines()
    if class_name not in served:
        raise ModelLoadError(f"{where} holds a {class_name}; glideserve serves {', '.join(served)}", "model")
    return served[class_name]
