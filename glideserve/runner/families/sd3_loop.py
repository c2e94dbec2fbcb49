"""SD3 / SD3.5 MMDiT forward, owned here so that rows of one batch can take different step kinds.

It mirrors ``SD3Transformer2DModel.forward`` and ``JointTransformerBlock.forward`` op for
op (tests compare them bit for bit), calling the model's own submodules, so attention
processors and adapters keep working. A batch is a list of ``RowGroup`` (one per
request): full rows run every block as one sub-batch; cached rows run only what their
policy needs; then every row goes through the final adaLN layer modulated by its own
timestep, and the output is in the batch's row order.

With ``compile`` the full rows' blocks run compiled at bucketed row counts
(``glideserve.runner.compiled``); cached rows never enter the blocks, so caching and
compilation compose without extra graphs. Steps with LoRA rows and FORA's recording
steps run their blocks eager: the per-row adapter plan is Python state that would make
dynamo recompile for every mix of adapters (docs/performance.md measures it).
"""

from __future__ import annotations

import contextlib

import torch

from glideserve.cache.policy import StepKind
from glideserve.runner.compiled import BatchBuckets, CompiledBlocks
from glideserve.runner.feature_cache import RowGroup, relative_l1, row_index
from glideserve.runner.lora import RowAdapters

FULL, CACHED, AUTO = StepKind.FULL, StepKind.CACHED, StepKind.AUTO


def run_block(block, hidden, context, temb, record: bool = False):
    """``JointTransformerBlock.forward`` (no joint_attention_kwargs); with ``record`` also return
    the image stream's ungated attention and MLP outputs, which FORA reuses."""
    if block.use_dual_attention:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden2, gate_msa2 = block.norm1(hidden, emb=temb)
    else:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
    if block.context_pre_only:
        norm_context = block.norm1_context(context, temb)
    else:
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(context, emb=temb)
    attn_output, context_attn_output = block.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_context)
    hidden = hidden + gate_msa.unsqueeze(1) * attn_output
    attn_output2 = None
    if block.use_dual_attention:
        attn_output2 = block.attn2(hidden_states=norm_hidden2)
        hidden = hidden + gate_msa2.unsqueeze(1) * attn_output2
    norm_hidden = block.norm2(hidden)
    norm_hidden = norm_hidden * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = _feed_forward(block, block.ff, norm_hidden)
    hidden = hidden + gate_mlp.unsqueeze(1) * ff_output
    if block.context_pre_only:
        context = None
    else:
        context = context + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_context = block.norm2_context(context)
        norm_context = norm_context * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp.unsqueeze(1) * _feed_forward(block, block.ff_context, norm_context)
    if record:
        return context, hidden, (attn_output, ff_output) if attn_output2 is None \
            else (attn_output, ff_output, attn_output2)
    return context, hidden


def block_variant(block) -> str:
    """Blocks of one variant have one structure, so they share compiled graphs."""
    return "joint" + ("-last" if block.context_pre_only else "") + ("-dual" if block.use_dual_attention else "")


def _feed_forward(block, ff, x):
    if block._chunk_size is None:
        return ff(x)
    from diffusers.models.attention import _chunked_feed_forward
    return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)


def reuse_block(block, hidden, temb, stored: tuple[torch.Tensor, ...]):
    """FORA's cached block: the stored attention and MLP outputs, gated by the new timestep's modulation."""
    norm1 = block.norm1
    emb = norm1.linear(norm1.silu(temb))
    chunks = emb.chunk(9 if block.use_dual_attention else 6, dim=1)
    gate_msa, gate_mlp = chunks[2], chunks[5]
    hidden = hidden + gate_msa.unsqueeze(1) * stored[0]
    if block.use_dual_attention:
        hidden = hidden + chunks[8].unsqueeze(1) * stored[2]
    return hidden + gate_mlp.unsqueeze(1) * stored[1]


class SD3BlockLoop:
    """Per-row step kinds for one ``SD3Transformer2DModel``; see the module docstring."""

    def __init__(self, transformer, lora_rows: RowAdapters | None = None):
        self.model = transformer
        self.lora_rows = lora_rows if lora_rows is not None else RowAdapters()
        self.compiled: CompiledBlocks | None = None
        # Only for measuring the alternative (benchmarks/compile_lora.py): LoRA rows inside compiled blocks.
        self.lora_inside_compiled = False

    def compile(self, buckets: BatchBuckets, mode: str = "default") -> CompiledBlocks:
        self.compiled = CompiledBlocks(run_block, buckets, block_variant, mode)
        return self.compiled

    def _run_block(self, block, hidden, context, temb, record: bool):
        if record or self.compiled is None or (self.lora_rows.in_use and not self.lora_inside_compiled):
            return run_block(block, hidden, context, temb, record=record)
        return self.compiled(block, hidden, context, temb)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                 groups: list[RowGroup]) -> tuple[torch.Tensor, list[StepKind]]:
        model = self.model
        if self.compiled is not None:
            self.compiled.begin_forward()
        height, width = latents.shape[-2:]
        hidden0 = model.pos_embed(latents).contiguous()
        temb = model.time_text_embed(timesteps, cond["pooled_projections"])
        kinds = [g.kind if g.cache is not None and g.cache.ready else FULL for g in groups]
        for i, g in enumerate(groups):
            if g.policy_kind in ("teacache", "adaptive"):
                change = self._input_change(g, hidden0[g.start:g.stop], temb[g.start:g.stop])
                if g.policy_kind == "teacache":
                    kinds[i] = self._teacache(g, kinds[i], change)
        finals: list[torch.Tensor | None] = [None] * len(groups)
        computing = [i for i, k in enumerate(kinds) if k is not CACHED]  # FULL, and AUTO (fbcache) run block 0
        if computing:
            with contextlib.ExitStack() as scopes:  # per-row LoRA follows the rows each forward runs
                self._compute(groups, kinds, computing, hidden0, temb, cond["encoder_hidden_states"], finals, scopes)
        for i, g in enumerate(groups):
            if kinds[i] is CACHED and finals[i] is None:
                finals[i] = self._cached(g, hidden0[g.start:g.stop], temb[g.start:g.stop])
        hidden = finals[0] if len(finals) == 1 else torch.cat(finals)
        return self._head(hidden, temb, height, width), kinds

    # -- full rows (and First-Block-Cache's first block) ---------------------------------
    def _compute(self, groups, kinds, computing, hidden0, temb, context_in, finals, scopes) -> None:
        model, blocks = self.model, self.model.transformer_blocks
        everyone = len(computing) == len(groups)
        idx = None if everyone else row_index(groups, computing, hidden0.device)
        scopes.enter_context(self.lora_rows.narrow(idx))
        hidden = hidden0 if everyone else hidden0[idx]
        temb_sub = temb if everyone else temb[idx]
        context = model.context_embedder(context_in if everyone else context_in[idx])
        members = [groups[i] for i in computing]
        fora = any(g.policy_kind == "fora" for g in members)
        offsets = _offsets(members)
        first_input, block_one_output = hidden, None
        for b, block in enumerate(blocks):
            out = self._run_block(block, hidden, context, temb_sub, fora)
            context, hidden = out[0], out[1]
            if fora:
                self._store_fora(members, offsets, b, out[2])
            if b == 0 and any(g.policy_kind == "fbcache" for g in members):
                keep = self._fbcache(members, offsets, [kinds[i] for i in computing], first_input, hidden)
                for j, kind in enumerate(keep):
                    kinds[computing[j]] = kind
                    if kind is CACHED:
                        finals[computing[j]] = hidden[offsets[j]:offsets[j] + members[j].rows] \
                            + members[j].cache.tensors["rest"]
                still = [j for j, kind in enumerate(keep) if kind is not CACHED]
                if not still:
                    return
                if len(still) < len(keep):  # the remaining blocks run only for the rows still computing
                    sub = torch.cat([torch.arange(offsets[j], offsets[j] + members[j].rows, device=hidden.device)
                                     for j in still])
                    scopes.enter_context(self.lora_rows.narrow(sub))
                    hidden, context, temb_sub, first_input = hidden[sub], context[sub], temb_sub[sub], first_input[sub]
                    computing, members = [computing[j] for j in still], [members[j] for j in still]
                    offsets = _offsets(members)
                block_one_output = hidden
        for j, g in enumerate(members):
            i = computing[j]
            kinds[i] = FULL
            out = hidden[offsets[j]:offsets[j] + g.rows]
            finals[i] = out
            if g.cache is not None:
                self._store(g, out, first_input[offsets[j]:offsets[j] + g.rows],
                            block_one_output[offsets[j]:offsets[j] + g.rows] if g.policy_kind == "fbcache" else None)

    def _store(self, g: RowGroup, final, first_input, block_one_output) -> None:
        cache, kind = g.cache, g.policy_kind
        if kind in ("glideserve", "adaptive"):
            cache.tensors["final"] = final.clone()
        elif kind == "taylorseer":
            if "final" in cache.tensors:
                cache.tensors["previous"] = cache.tensors["final"]
                cache.stats["previous_step"] = cache.stats["final_step"]
            cache.tensors["final"] = final.clone()
            cache.stats["final_step"] = float(g.step_index)
        elif kind == "teacache":
            cache.tensors["residual"] = final - first_input
            cache.stats["accumulated"] = 0.0
        elif kind == "fbcache":
            cache.tensors["rest"] = final - block_one_output

    @staticmethod
    def _store_fora(members, offsets, b, outputs) -> None:
        for j, g in enumerate(members):
            if g.policy_kind != "fora":
                continue
            rows = slice(offsets[j], offsets[j] + g.rows)
            stored = tuple(t[rows].clone() for t in outputs)
            if b == 0:
                g.cache.blocks = []
            g.cache.blocks.append(stored)

    # -- decisions of the threshold policies, each from its own rows only -----------------
    def _input_change(self, g: RowGroup, hidden, temb) -> float | None:
        """TeaCache's indicator for one request: the relative L1 change of its timestep-modulated
        input since its previous step (None at its first step); kept in ``stats["change"]``."""
        modulated = self.model.transformer_blocks[0].norm1(hidden, emb=temb)[0]
        cache = g.cache
        previous = cache.tensors.get("modulated")
        cache.tensors["modulated"] = modulated
        if previous is None:
            cache.stats.pop("change", None)
            return None
        cache.stats["change"] = relative_l1(modulated, previous)
        return cache.stats["change"]

    @staticmethod
    def _teacache(g: RowGroup, kind: StepKind, change: float | None) -> StepKind:
        if kind is not AUTO:
            return kind
        if change is None:
            return FULL
        cache = g.cache
        cache.stats["accumulated"] = cache.stats.get("accumulated", 0.0) + change
        return CACHED if cache.stats["accumulated"] < cache.policy.threshold else FULL

    @staticmethod
    def _fbcache(members, offsets, kinds, first_input, block_one_output) -> list[StepKind]:
        decided = []
        for j, g in enumerate(members):
            if g.policy_kind != "fbcache":
                decided.append(kinds[j])
                continue
            rows = slice(offsets[j], offsets[j] + g.rows)
            residual = block_one_output[rows] - first_input[rows]
            previous = g.cache.tensors.get("first_residual")
            cached = kinds[j] is AUTO and previous is not None and "rest" in g.cache.tensors \
                and relative_l1(residual, previous) < g.cache.policy.threshold
            if not cached:
                g.cache.tensors["first_residual"] = residual
            decided.append(CACHED if cached else FULL)
        return decided

    # -- cached rows -------------------------------------------------------------------
    def _cached(self, g: RowGroup, hidden0, temb) -> torch.Tensor:
        cache, kind = g.cache, g.policy_kind
        if kind in ("glideserve", "adaptive"):
            return cache.tensors["final"]
        if kind == "teacache":
            return hidden0 + cache.tensors["residual"]
        if kind == "taylorseer":
            final = cache.tensors["final"]
            if "previous" not in cache.tensors:
                return final
            span = cache.stats["final_step"] - cache.stats["previous_step"]
            slope = (final - cache.tensors["previous"]) / span
            return final + (g.step_index - cache.stats["final_step"]) * slope
        if kind == "fora":
            hidden = hidden0
            for block, stored in zip(self.model.transformer_blocks, cache.blocks):
                hidden = reuse_block(block, hidden, temb, stored)
            return hidden
        raise ValueError(f"the SD3 block loop cannot take a cached step for policy {kind!r}")

    def _head(self, hidden, temb, height, width) -> torch.Tensor:
        model = self.model
        hidden = model.norm_out(hidden, temb)
        hidden = model.proj_out(hidden)
        patch = model.config.patch_size
        height, width = height // patch, width // patch
        hidden = hidden.reshape(shape=(hidden.shape[0], height, width, patch, patch, model.out_channels))
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(shape=(hidden.shape[0], model.out_channels, height * patch, width * patch))


def _offsets(members: list[RowGroup]) -> list[int]:
    offsets, at = [], 0
    for g in members:
        offsets.append(at)
        at += g.rows
    return offsets
