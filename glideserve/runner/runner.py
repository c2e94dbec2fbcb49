"""ModelRunner: executes one SchedulerOutput on the model and reports what happened."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

from glideserve.cache.policy import StepKind, parse_cache_policy
from glideserve.config import EngineConfig
from glideserve.params import GenerationParams
from glideserve.runner.batch import PersistentBatch, RequestState
from glideserve.runner.compiled import BatchBuckets, CompileStats, allow_recompiles, default_buckets
from glideserve.runner.encode import PromptEncoder
from glideserve.runner.families.base import DenoiserFamily
from glideserve.runner.feature_cache import FeatureCache, RowGroup
from glideserve.runner.latent_aware import latent_aware_step
from glideserve.runner.lora import LoraStore, install_row_lora, targetable_linear_paths
from glideserve.runner.lora_files import TEXT_ENCODERS
from glideserve.runner.precision import attention_scope
from glideserve.runner.samplers import SamplerFactory
from glideserve.scheduler.output import (DecodeTiming, FinishedImage, GroupTiming, NewRequestData, RunnerOutput,
                                        SchedulerOutput)

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the persistent batch and runs prefill, one denoising step, and decode.

    ``execute`` frees the ids the scheduler released, prefills new requests (one
    batched text-encoder call with the prompts it is asked to encode ahead, seeded
    noise, a sampler each, a feature cache when the scheduler granted one), runs one
    batched forward per image size with every row at its own timestep and step kind
    (the family's block loop splits full and cached rows), steps each request's
    sampler on its slice, and decodes (one
    batched VAE call per size) the denoised requests the plan lists. It never decides
    who runs or when to decode: that is the scheduler's.

    With ``config.compile`` the family's block loop calls its blocks compiled at row
    buckets; ``warm_up_compiled`` compiles every bucket at the given sizes (at load,
    before the latency profile is measured) and then freezes the set of shapes.
    """

    def __init__(self, family: DenoiserFamily, samplers: SamplerFactory, config: EngineConfig):
        self.family = family
        self.samplers = samplers
        self.config = config
        self.batch = PersistentBatch()
        self.encoder = PromptEncoder(family, config.prompt_cache_size)
        self.loras = None if config.lora_dir is None else LoraStore(
            config.lora_dir, family.denoiser_prefix, family.pipeline_class, family.dtype, family.device,
            config.max_loras, _lora_modules(family), max_resident_bytes=int(config.lora_memory_mb * 2**20))
        self.attention = config.attention
        self.compiled = self._compile(config) if config.compile else None

    def _compile(self, config: EngineConfig):
        family = self.family
        denoiser = family.denoiser_of(family.pipe)
        if self.loras is not None:  # wrapped now: wrapping a layer after warm-up would change the compiled graphs
            install_row_lora(denoiser, targetable_linear_paths(denoiser), family.lora_rows)
        buckets = BatchBuckets(config.compile_buckets or default_buckets(config.scheduler.max_batch_rows))
        return family.loop.compile(buckets, config.compile_mode)

    def offload(self) -> None:
        """Move the weights to host memory and drop what lives on the device beside them (cached prompt
        embeddings, resident adapters); only for an idle runner. ``restore`` moves the weights back."""
        if len(self.batch):
            raise RuntimeError("cannot offload a model with requests in its batch")
        self.family.pipe.to("cpu")
        self.batch = PersistentBatch()  # empty, but its conditioning cache may hold device tensors
        self.encoder.clear()
        if self.loras is not None:
            self.loras.evict_all()

    def restore(self) -> None:
        self.family.pipe.to(self.family.device)

    @torch.inference_mode()
    def warm_up_compiled(self, sizes: list[tuple[int, int]], progress=None) -> CompileStats:
        """Compile every bucket at every (height, width) in ``sizes``; ``progress(done, total, message)``
        after each. Afterwards other shapes run eager."""
        family, compiled = self.family, self.compiled
        allow_recompiles(len(sizes) * len(compiled.buckets) * len(family.repeated_blocks(
            family.denoiser_of(family.pipe))))
        cond = family.encode([""])[0]
        generator = torch.Generator("cpu").manual_seed(0)
        total, done = len(sizes) * len(compiled.buckets), 0
        for height, width in sizes:
            extra = family.row_cond(GenerationParams("warm-up", height=height, width=width))
            for rows in compiled.buckets.sizes:
                start = time.perf_counter()
                shape = (rows, *family.spec.latent_shape(height, width))
                latents = torch.randn(shape, generator=generator).to(family.device, family.dtype)
                batch = {name: value.expand(rows, *value.shape[1:]) for name, value in {**cond, **extra}.items()}
                with attention_scope(self.attention):
                    family.forward(latents, torch.full((rows,), 500.0, device=family.device), batch)
                done += 1
                label = f"{rows} rows at {width}x{height}"
                compiled.stats.warmup[label] = time.perf_counter() - start
                if progress is not None:
                    progress(done, total, f"{label} in {compiled.stats.warmup[label]:.1f} s")
        compiled.freeze()
        return compiled.stats

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        timing = out.timing
        for rid in plan.freed:
            self.batch.remove(rid)
        t0 = time.perf_counter()
        if plan.new_requests:
            self._prefill(plan.new_requests, plan.encode_ahead, out)
            timing.prefill_requests = len(plan.new_requests) + len(plan.encode_ahead)
        t1 = time.perf_counter()
        for states in self.batch.groups(plan.scheduled).values():
            self._denoise_group(states, plan.step_kinds, out)
        t2 = time.perf_counter()
        if plan.decode:
            self._decode(plan.decode, out)
        timing.prefill_s, timing.denoise_s, timing.decode_s = t1 - t0, t2 - t1, time.perf_counter() - t2
        return out

    # -- prefill -------------------------------------------------------------------
    def _prefill(self, new: tuple[NewRequestData, ...], ahead: tuple[str, ...], out: RunnerOutput) -> None:
        adapters = {}
        for d in new:  # adapters first: a text-encoder LoRA changes the request's prompt embeddings
            try:
                adapters[d.request_id] = self._adapters(d.params)
            except Exception as exc:
                log.exception("loading the LoRAs of %s failed", d.request_id)
                out.failed[d.request_id] = f"loading its LoRA adapters failed: {exc}"
        new = tuple(d for d in new if d.request_id in adapters)
        keys = [(d.params.prompt, _text_adapters(adapters[d.request_id])) for d in new]
        keys += [(d.params.negative_prompt or "", _text_adapters(adapters[d.request_id]))
                 for d in new if d.params.uses_cfg]
        keys += [(text, ()) for text in ahead]  # waiting requests' prompts, so their own prefill hits the cache
        try:
            embeds = self.encoder.encode(keys)
        except Exception as exc:  # a failing text encoder fails these requests, not the engine
            log.exception("text encoding failed")
            for d in new:
                out.failed[d.request_id] = f"text encoding failed: {exc}"
            return
        for data in new:
            try:
                self.batch.add(self._new_state(data, embeds, adapters[data.request_id]))
            except Exception as exc:
                log.exception("prefill of %s failed", data.request_id)
                out.failed[data.request_id] = f"prefill failed: {exc}"

    def _new_state(self, data: NewRequestData, embeds: dict, adapters: tuple) -> RequestState:
        p = data.params
        family = self.family
        generator = torch.Generator("cpu").manual_seed(p.seed)
        sampler = self.samplers.create(p.sampler, p.num_inference_steps, p.height, p.width,
                                       family.spec.vae_scale_factor, generator)
        latents = family.init_latents(p, generator, sampler)
        text = _text_adapters(adapters)
        positive = embeds[(p.prompt, text)]
        rows = [positive]
        if p.uses_cfg:
            rows.insert(0, family.negative_cond(p, positive) or embeds[(p.negative_prompt or "", text)])
        cond = {name: torch.cat([r[name] for r in rows]) for name in positive}
        for name, value in family.row_cond(p).items():
            cond[name] = value.expand(len(rows), *value.shape[1:])
        policy = parse_cache_policy(p.cache)
        cache = FeatureCache(policy) if policy.enabled and data.cache_granted else None
        return RequestState(data.request_id, p, latents, sampler, cond, generator,
                            family.spec.tokens_per_row(p.height, p.width), p.preview_steps(len(sampler.timesteps)),
                            cache, adapters)

    def _adapters(self, params) -> tuple:
        """The request's adapters, their layers wrapped in the denoiser and text encoders (here, between
        forwards, on the thread that runs them)."""
        if not params.lora:
            return ()
        if self.loras is None:
            raise ValueError("a request names a LoRA but the engine has no LoRA directory")
        adapters = tuple((self.loras.get(name), scale) for name, scale in params.lora)
        family = self.family
        denoiser = family.denoiser_of(family.pipe)
        for adapter, _ in adapters:
            install_row_lora(denoiser, adapter.layers, family.lora_rows)
            for encoder, layers in adapter.text_layers.items():
                install_row_lora(getattr(family.pipe, encoder), layers, family.text_lora_rows, encoder)
        return adapters

    # -- one denoising step for one image size --------------------------------------
    def _denoise_group(self, states: list[RequestState], step_kinds, out: RunnerOutput) -> None:
        start = time.perf_counter()
        try:
            inputs, timesteps, rows, offset = [], [], [], 0
            for s in states:
                x = torch.cat([s.latents, s.latents]) if s.params.uses_cfg else s.latents
                inputs.append(s.sampler.scale_input(x))
                timesteps.append(s.sampler.timestep.reshape(1).float().expand(s.rows))
                rows.append(RowGroup(offset, s.rows, step_kinds.get(s.request_id, StepKind.FULL), s.cache,
                                     s.sampler.index))
                offset += s.rows
            key = states[0].shape_key
            per_row = [s.lora for s in states for _ in range(s.rows)]
            scope = self.family.lora_rows.rows(per_row, self.family.device) if any(per_row) else nullcontext()
            with scope, attention_scope(self.attention):
                noise, kinds = self.family.denoise(torch.cat(inputs), torch.cat(timesteps).to(self.family.device),
                                                   self.batch.group_cond(key, states), rows)
            offset = 0
            for s, kind in zip(states, kinds):
                out.step_kinds[s.request_id] = kind
                if s.cache is not None and "change" in s.cache.stats:
                    out.cache_change[s.request_id] = s.cache.stats["change"]
                pred = noise[offset:offset + s.rows]
                offset += s.rows
                if s.params.uses_cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + s.params.guidance_scale * (text - uncond)
                if s.params.latent_aware:
                    s.latents, pred = latent_aware_step(s.latents, pred, s.generator)
                s.latents, denoised = s.sampler.step(pred, s.latents)
                out.stepped.append(s.request_id)
                if s.sampler.done:
                    s.cache = None  # its features are never read again: free them now, not at decode
                if not s.sampler.done and s.sampler.index in s.preview_steps:
                    out.previews[s.request_id] = self._preview(s.latents if denoised is None else denoised)
            cached = sum(s.rows for s, kind in zip(states, kinds) if kind is StepKind.CACHED)
            out.timing.groups.append(GroupTiming(states[0].tokens_per_row, sum(s.rows for s in states), len(states),
                                                 time.perf_counter() - start, cached))
        except Exception as exc:  # fail the group's requests; the engine keeps serving others
            log.exception("denoising step failed for %d requests", len(states))
            for s in states:
                self.batch.remove(s.request_id)
                out.failed[s.request_id] = f"denoising failed: {exc}"
                if s.request_id in out.stepped:
                    out.stepped.remove(s.request_id)

    def _preview(self, latents: torch.Tensor):
        """Half-resolution decode of the predicted clean image; only for requests that asked."""
        image = self.family.decode(latents)[0]
        return image.resize((max(1, image.width // 2), max(1, image.height // 2)))

    # -- decode ----------------------------------------------------------------------
    def _decode(self, request_ids: tuple[str, ...], out: RunnerOutput) -> None:
        groups: dict[tuple[int, int], list[RequestState]] = {}
        for rid in request_ids:
            state = self.batch.remove(rid)
            if state is None or not state.sampler.done:
                out.failed.setdefault(rid, "internal error: asked to decode a request that has not finished denoising")
                continue
            groups.setdefault(state.shape_key, []).append(state)
        for states in groups.values():
            start = time.perf_counter()
            try:
                images = self.family.decode(torch.cat([s.latents for s in states]))
            except Exception as exc:
                log.exception("decode failed for %d requests", len(states))
                for s in states:
                    out.failed[s.request_id] = f"decode failed: {exc}"
                continue
            elapsed = time.perf_counter() - start
            out.timing.decodes.append(DecodeTiming(states[0].tokens_per_row, len(states), elapsed))
            for s, image in zip(states, images):
                out.finished[s.request_id] = FinishedImage(image, elapsed)


def _text_adapters(adapters: tuple) -> tuple:
    """The (adapter, scale) pairs that change the text encoders: the prompt cache keys on them."""
    return tuple((adapter, scale) for adapter, scale in adapters if adapter.text_layers)


def _lora_modules(family: DenoiserFamily) -> dict:
    """The modules a LoRA file's components may target: the denoiser and the pipeline's CLIP text encoders."""
    modules = {family.denoiser_prefix: family.denoiser_of(family.pipe)}
    for name in TEXT_ENCODERS:
        encoder = getattr(family.pipe, name, None)
        if encoder is not None:
            modules[name] = encoder
    return modules
