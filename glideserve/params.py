"""Per-request generation parameters and their validation against a model."""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass

from glideserve.cache.policy import parse_cache_policy
from glideserve.errors import InvalidRequestError
from glideserve.models.spec import ModelSpec

MAX_STEPS = 200
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE = 100.0
MAX_PARTIAL_IMAGES = 3
MAX_PRIORITY = 1000
MAX_SLO_MS = 86_400_000.0  # one day
MAX_LORAS_PER_REQUEST = 8
MAX_LORA_SCALE = 8.0
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class GenerationParams:
    """What one image request asks for. ``None`` fields take the model's defaults.

    ``resolve`` fills the defaults and validates every field, raising
    :class:`InvalidRequestError` (never ``AssertionError``) with a message that names
    the field and the accepted range. A resolved instance has no ``None`` left except
    ``negative_prompt`` (``None`` keeps the pipeline's own default negative conditioning)
    and ``slo_ms``.

    ``slo_ms`` is the latency target from arrival to image: the request's deadline is
    its arrival plus ``slo_ms``; ``None`` makes it best effort (served after requests
    with deadlines, never refused or dropped for lateness). ``priority`` (higher is
    served first, -1000..1000) orders best-effort requests and breaks ties between
    requests with deadlines. ``cache`` is the step-caching policy (see
    ``glideserve.cache.policy``; ``None``: the engine's default), resolved to its
    canonical spelling. ``lora`` names LoRA adapters from the server's LoRA directory:
    a name (scale 1.0) or a list of ``{"name": ..., "scale": ...}`` (or ``(name, scale)``
    pairs), at most 8, scales in -8..8; resolved to a tuple of ``(name, scale)`` pairs.
    ``latent_aware`` turns on latent-aware denoising (flow-matching
    models only; see ``glideserve.runner.latent_aware``; ``None``: the engine's default).
    ``model`` names which of a multi-model engine's models serves the request (``None``:
    its default model); a one-model engine checks nothing else about it.
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    sampler: str | None = None
    request_id: str | None = None
    partial_images: int = 0
    slo_ms: float | None = None
    priority: int = 0
    cache: str | None = None
    latent_aware: bool | None = None
    lora: object = ()
    model: str | None = None

    def resolve(self, spec: ModelSpec, max_image_side: int = 2048, default_cache: str = "none",
                default_latent_aware: bool = False) -> "GenerationParams":
        _check_prompt(self.prompt, "prompt")
        if self.negative_prompt is not None:
            _check_prompt(self.negative_prompt, "negative_prompt", allow_empty=True)
        steps = spec.default_steps if self.num_inference_steps is None else self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise InvalidRequestError(
                f"num_inference_steps must be an integer in 1..{MAX_STEPS}, got {steps!r}", "num_inference_steps")
        guidance = spec.default_guidance if self.guidance_scale is None else self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidRequestError(
                f"guidance_scale must be a number in 0..{MAX_GUIDANCE:g}, got {guidance!r}", "guidance_scale")
        seed = secrets.randbelow(2**31) if self.seed is None else self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}", "seed")
        if spec.max_side is not None:
            max_image_side = min(max_image_side, spec.max_side)
        height = spec.default_height if self.height is None else self.height
        width = spec.default_width if self.width is None else self.width
        for field, value in (("height", height), ("width", width)):
            _check_side(field, value, spec.size_multiple, max_image_side)
        if isinstance(self.partial_images, bool) or not isinstance(self.partial_images, int) \
                or not 0 <= self.partial_images <= MAX_PARTIAL_IMAGES:
            raise InvalidRequestError(
                f"partial_images must be an integer in 0..{MAX_PARTIAL_IMAGES}, got {self.partial_images!r}",
                "partial_images")
        if self.slo_ms is not None and (isinstance(self.slo_ms, bool) or not isinstance(self.slo_ms, (int, float))
                                        or not 0 < self.slo_ms <= MAX_SLO_MS):
            raise InvalidRequestError(f"slo_ms must be a number in (0, {MAX_SLO_MS:.0f}], got {self.slo_ms!r}",
                                      "slo_ms")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise InvalidRequestError(
                f"priority must be an integer in -{MAX_PRIORITY}..{MAX_PRIORITY}, got {self.priority!r}", "priority")
        sampler = spec.default_sampler if self.sampler is None else self.sampler
        if sampler not in spec.samplers:
            raise InvalidRequestError(
                f"unknown sampler {sampler!r} for a {spec.family} model; choose one of {', '.join(spec.samplers)}",
                "sampler")
        slo_ms = None if self.slo_ms is None else float(self.slo_ms)
        cache = parse_cache_policy(default_cache if self.cache is None else self.cache)
        if cache.kind not in spec.cache_policies:
            raise InvalidRequestError(
                f"cache policy {cache.kind!r} is not available for a {spec.family} model; choose one of "
                f"{', '.join(spec.cache_policies)}", "cache")
        latent_aware = default_latent_aware if self.latent_aware is None else self.latent_aware
        if not isinstance(latent_aware, bool):
            raise InvalidRequestError(f"latent_aware must be true or false, got {latent_aware!r}", "latent_aware")
        if latent_aware and not spec.flow_matching:
            raise InvalidRequestError("latent_aware needs a flow-matching model (SD3 / SD3.5); this is a "
                                      f"{spec.family} model", "latent_aware")
        return dataclasses.replace(self, num_inference_steps=steps, guidance_scale=float(guidance), seed=seed,
                                   height=height, width=width, sampler=sampler, slo_ms=slo_ms, cache=str(cache),
                                   latent_aware=latent_aware, lora=resolve_lora(self.lora))

    def preview_steps(self, num_steps: int) -> frozenset[int]:
        """Steps (counted from 1) after which a preview is produced: evenly spaced, never the last."""
        n = self.partial_images
        return frozenset(s for k in range(1, n + 1) if 0 < (s := round(num_steps * k / (n + 1))) < num_steps)

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance doubles the rows; guidance <= 1 runs the conditional row only."""
        return self.guidance_scale is not None and self.guidance_scale > 1.0


def resolve_lora(value: object) -> tuple[tuple[str, float], ...]:
    """``lora`` in any accepted form as a tuple of ``(name, scale)`` pairs; InvalidRequestError otherwise."""
    if value is None or value == () or value == []:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or len(items) > MAX_LORAS_PER_REQUEST:
        raise InvalidRequestError(f"lora must be a name or a list of at most {MAX_LORAS_PER_REQUEST} "
                                  '{"name": ..., "scale": ...} objects', "lora")
    pairs = []
    for item in items:
        if isinstance(item, str):
            name, scale = item, 1.0
        elif isinstance(item, dict) and set(item) <= {"name", "scale"} and "name" in item:
            name, scale = item["name"], item.get("scale", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, scale = item
        else:
            raise InvalidRequestError('each lora entry must be a name or {"name": ..., "scale": ...}', "lora")
        if not isinstance(name, str) or not LORA_NAME.fullmatch(name):
            raise InvalidRequestError("a LoRA name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                      f"or digit; got {name!r}", "lora")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise InvalidRequestError(f"a LoRA scale must be a number in -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}, "
                                      f"got {scale!r}", "lora")
        pairs.append((name, float(scale)))
    if len({n for n, _ in pairs}) != len(pairs):
        raise InvalidRequestError("a LoRA is named twice; give each adapter once with its scale", "lora")
    return tuple(pairs)


def _check_prompt(text: object, field: str, allow_empty: bool = False) -> None:
    if not isinstance(text, str):
        raise InvalidRequestError(f"{field} must be a string", field)
    if not allow_empty and not text.strip():
        raise InvalidRequestError(f"{field} must not be empty", field)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"{field} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}", field)


def _check_side(field: str, value: object, multiple: int, max_side: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not multiple <= value <= max_side:
        raise InvalidRequestError(f"{field} must be an integer in {multiple}..{max_side}, got {value!r}", field)
    if value % multiple:
        raise InvalidRequestError(
            f"{field}={value} is not a multiple of {multiple} (the model's VAE factor x patch size); "
            f"try {max(multiple, round(value / multiple) * multiple)}", field)


# The one grammar of a size: ASCII digits only, no sign, no leading zero, no spaces,
# at most five digits a side, and an "x" (either case) between. ``str.isdigit`` and
# ``int`` accept far more (superscripts, other scripts' digits, "1_0", " 64"), which
# either crashed the parser or silently accepted text that is not a size.
SIZE_PATTERN = re.compile(r"([1-9][0-9]{0,4})[xX]([1-9][0-9]{0,4})")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (see SIZE_PATTERN) into ``(height, width)``; raises InvalidRequestError otherwise."""
    match = SIZE_PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidRequestError(
            f"size must look like 512x512 (WIDTHxHEIGHT in ASCII digits, no spaces or leading zeros), got {text!r}",
            "size")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width
