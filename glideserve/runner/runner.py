"""ModelRunner: executes one SchedulerOutput on the model and reports what happened."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from glideserve.config import EngineConfig
from glideserve.runner.batch import PersistentBatch, RequestState
from glideserve.runner.encode import PromptEncoder
from glideserve.runner.families.base import DenoiserFamily
from glideserve.runner.samplers import SamplerFactory
from glideserve.scheduler.output import NewRequestData, RunnerOutput, SchedulerOutput

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the persistent batch and runs prefill, one denoising step, and decode.

    ``execute`` frees the ids the scheduler released, prefills new requests (batched
    text encoding, seeded noise, a sampler each), runs one batched forward per image
    size with every row at its own timestep, steps each request's sampler on its
    slice, and decodes (batched, at most ``max_decode_batch`` images) the requests
    whose last step just ran. It never decides who runs: that is the scheduler's.
    """

    def __init__(self, family: DenoiserFamily, samplers: SamplerFactory, config: EngineConfig):
        self.family = family
        self.samplers = samplers
        self.config = config
        self.batch = PersistentBatch()
        self.encoder = PromptEncoder(family, config.prompt_cache_size)
        self._decode_queue: deque[str] = deque()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        for rid in plan.freed:
            self.batch.remove(rid)
            if rid in self._decode_queue:
                self._decode_queue.remove(rid)
        t0 = time.perf_counter()
        if plan.new_requests:
            self._prefill(plan.new_requests, out)
        t1 = time.perf_counter()
        for states in self.batch.groups(plan.scheduled).values():
            self._denoise_group(states, out)
        t2 = time.perf_counter()
        self._decode(out)
        out.timing = {"prefill_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": time.perf_counter() - t2}
        return out

    # -- prefill -------------------------------------------------------------------
    def _prefill(self, new: tuple[NewRequestData, ...], out: RunnerOutput) -> None:
        texts = [d.params.prompt for d in new]
        texts += [d.params.negative_prompt or "" for d in new if d.params.uses_cfg]
        try:
            embeds = self.encoder.encode(texts)
        except Exception as exc:  # a failing text encoder fails these requests, not the engine
            log.exception("text encoding failed")
            for d in new:
                out.failed[d.request_id] = f"text encoding failed: {exc}"
            return
        for data in new:
            try:
                self.batch.add(self._new_state(data, embeds))
            except Exception as exc:
                log.exception("prefill of %s failed", data.request_id)
                out.failed[data.request_id] = f"prefill failed: {exc}"

    def _new_state(self, data: NewRequestData, embeds: dict) -> RequestState:
        p = data.params
        family = self.family
        generator = torch.Generator("cpu").manual_seed(p.seed)
        sampler = self.samplers.create(p.sampler, p.num_inference_steps, p.height, p.width,
                                       family.spec.vae_scale_factor, generator)
        latents = family.init_latents(p, generator, sampler)
        positive = embeds[p.prompt]
        rows = [positive]
        if p.uses_cfg:
            rows.insert(0, family.negative_cond(p, positive) or embeds[p.negative_prompt or ""])
        cond = {name: torch.cat([r[name] for r in rows]) for name in positive}
        for name, value in family.row_cond(p).items():
            cond[name] = value.expand(len(rows), *value.shape[1:])
        return RequestState(data.request_id, p, latents, sampler, cond, generator,
                            p.preview_steps(len(sampler.timesteps)))

    # -- one denoising step for one image size --------------------------------------
    def _denoise_group(self, states: list[RequestState], out: RunnerOutput) -> None:
        try:
            inputs, timesteps = [], []
            for s in states:
                x = torch.cat([s.latents, s.latents]) if s.params.uses_cfg else s.latents
                inputs.append(s.sampler.scale_input(x))
                timesteps.append(s.sampler.timestep.reshape(1).float().expand(s.rows))
            key = states[0].shape_key
            noise = self.family.forward(torch.cat(inputs), torch.cat(timesteps).to(self.family.device),
                                        self.batch.group_cond(key, states))
            offset = 0
            for s in states:
                pred = noise[offset:offset + s.rows]
                offset += s.rows
                if s.params.uses_cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + s.params.guidance_scale * (text - uncond)
                s.latents, denoised = s.sampler.step(pred, s.latents)
                out.stepped.append(s.request_id)
                if s.sampler.done:
                    self._decode_queue.append(s.request_id)
                elif s.sampler.index in s.preview_steps:
                    out.previews[s.request_id] = self._preview(s.latents if denoised is None else denoised)
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
    def _decode(self, out: RunnerOutput) -> None:
        ready = []
        while self._decode_queue and len(ready) < self.config.max_decode_batch:
            state = self.batch.remove(self._decode_queue.popleft())
            if state is not None:
                ready.append(state)
        groups: dict[tuple[int, int], list[RequestState]] = {}
        for s in ready:
            groups.setdefault(s.shape_key, []).append(s)
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
            for s, image in zip(states, images):
                out.finished[s.request_id] = (image, elapsed)
