"""UNet2DConditionModel forward, owned here so that rows of one batch can take different step kinds.

It mirrors ``UNet2DConditionModel.forward`` for what the served pipelines pass
(timesteps, text embeddings, SDXL's added conditioning; no ControlNet, adapters or
masks) op for op, calling the model's own blocks. A full row runs the whole UNet; a
``deepcache:N`` row stores the output of the second-to-last up block. A cached
``deepcache`` row runs only the outermost down block (for fresh skip connections)
and the outermost up block on its stored features, as DeepCache does.

With ``compile`` every down, mid and up block runs compiled at bucketed row counts
(``glideserve.runner.compiled``), DeepCache's cached path included (it calls the same
outermost blocks); steps with LoRA rows run eager.
"""

from __future__ import annotations

import torch

from glideserve.cache.policy import StepKind
from glideserve.runner.compiled import BatchBuckets, CompiledBlocks
from glideserve.runner.feature_cache import RowGroup, row_index
from glideserve.runner.lora import RowAdapters

FULL, CACHED = StepKind.FULL, StepKind.CACHED


def _call(block, sample, emb, context, **kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=context, **kwargs)
    return block(hidden_states=sample, temb=emb, **kwargs)


class UNetBlockLoop:
    """Per-row step kinds for one ``UNet2DConditionModel``; see the module docstring."""

    def __init__(self, unet, lora_rows: RowAdapters | None = None):
        self.model = unet
        self.lora_rows = lora_rows if lora_rows is not None else RowAdapters()
        self.compiled: CompiledBlocks | None = None

    def compile(self, buckets: BatchBuckets, mode: str = "default") -> CompiledBlocks:
        model = self.model
        names = {id(b): f"down{i}" for i, b in enumerate(model.down_blocks)}
        names.update({id(b): f"up{i}" for i, b in enumerate(model.up_blocks)})
        if model.mid_block is not None:
            names[id(model.mid_block)] = "mid"
        self.compiled = CompiledBlocks(_call, buckets, lambda block: names[id(block)], mode)
        return self.compiled

    def _call(self, block, sample, emb, context, **kwargs):
        if self.compiled is None or self.lora_rows.in_use:
            return _call(block, sample, emb, context, **kwargs)
        return self.compiled(block, sample, emb, context, **kwargs)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                 groups: list[RowGroup]) -> tuple[torch.Tensor, list[StepKind]]:
        model = self.model
        if self.compiled is not None:
            self.compiled.begin_forward()
        upsample_factor = 2 ** model.num_upsamplers
        forward_upsample_size = any(dim % upsample_factor != 0 for dim in latents.shape[-2:])
        sample = 2 * latents - 1.0 if model.config.center_input_sample else latents
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
        context = cond["encoder_hidden_states"]
        t_emb = model.get_time_embed(sample=sample, timestep=timesteps)
        emb = model.time_embedding(t_emb, None)
        if model.get_class_embed(sample=sample, class_labels=None) is not None:
            raise ValueError("class-conditioned UNets are not served")
        aug_emb = model.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug_emb if aug_emb is not None else emb
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        context = model.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        sample = model.conv_in(sample)
        kinds = [g.kind if g.cache is not None and g.cache.ready else FULL for g in groups]
        full = [i for i, k in enumerate(kinds) if k is not CACHED]
        cached = [i for i, k in enumerate(kinds) if k is CACHED]
        if not cached:
            out = self._full(sample, emb, context, forward_upsample_size, groups, full)
        else:
            out = torch.empty((latents.shape[0], model.config.out_channels, *latents.shape[-2:]),
                              dtype=latents.dtype, device=latents.device)
            for selected, run in ((full, self._full), (cached, self._cached)):
                if selected:
                    idx = row_index(groups, selected, latents.device)
                    with self.lora_rows.narrow(idx):  # per-row LoRA follows the rows this forward runs
                        out[idx] = run(sample[idx], emb[idx], context[idx], forward_upsample_size, groups, selected)
        return out, kinds

    def _full(self, sample, emb, context, forward_upsample_size, groups, selected):
        model = self.model
        res_samples = (sample,)
        for block in model.down_blocks:
            sample, res = self._call(block, sample, emb, context)
            res_samples += res
        if model.mid_block is not None:
            sample = self._call(model.mid_block, sample, emb, context)
        last = len(model.up_blocks) - 1
        for i, block in enumerate(model.up_blocks):
            res = res_samples[-len(block.resnets):]
            res_samples = res_samples[:-len(block.resnets)]
            upsample_size = res_samples[-1].shape[2:] if i < last and forward_upsample_size else None
            if i == last:
                self._store(groups, selected, sample)
            sample = self._call(block, sample, emb, context, res_hidden_states_tuple=res, upsample_size=upsample_size)
        return self._head(sample)

    def _store(self, groups, selected, deep_features) -> None:
        at = 0
        for i in selected:
            g = groups[i]
            if g.policy_kind == "deepcache":
                g.cache.tensors["deep"] = deep_features[at:at + g.rows].clone()
            at += g.rows

    def _cached(self, sample, emb, context, forward_upsample_size, groups, selected):
        model = self.model
        first, last = model.down_blocks[0], model.up_blocks[-1]
        _, res = self._call(first, sample, emb, context)
        res_samples = ((sample,) + res)[:len(last.resnets)]
        deep = torch.cat([groups[i].cache.tensors["deep"] for i in selected])
        return self._head(self._call(last, deep, emb, context, res_hidden_states_tuple=res_samples,
                                     upsample_size=None))

    def _head(self, sample):
        model = self.model
        if model.conv_norm_out:
            sample = model.conv_norm_out(sample)
            sample = model.conv_act(sample)
        return model.conv_out(sample)
