"""glideserve: step-level serving of text-to-image diffusion models."""

from glideserve.config import EngineConfig, SchedulerConfig
from glideserve.engine.async_engine import AsyncEngine
from glideserve.engine.engine import Engine
from glideserve.errors import GlideServeError
from glideserve.outputs import GenerationResult, Queued, RequestFailed, StepProgress
from glideserve.params import GenerationParams

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "GenerationParams", "GenerationResult", "GlideServeError",
           "Queued", "RequestFailed", "SchedulerConfig", "StepProgress"]
__version__ = "0.1.0"
