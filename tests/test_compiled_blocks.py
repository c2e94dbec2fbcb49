"""Compiled blocks: bucket arithmetic, padding invisible to results, a bounded set of graphs, eager fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glideserve import Engine, GenerationParams
from glideserve.runner.compiled import BatchBuckets, CompiledBlocks, _pad, _unpad, default_buckets


def test_default_buckets_are_powers_of_two_up_to_the_budget():
    assert default_buckets(16) == (1, 2, 4, 8, 16)
    assert default_buckets(12) == (1, 2, 4, 8, 12)
    assert default_buckets(1) == (1,)


def test_bucket_is_the_smallest_that_holds_the_rows():
    buckets = BatchBuckets((8, 2, 4, 2))
    assert buckets.sizes == (2, 4, 8)
    assert [buckets.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="positive row counts"):
        BatchBuckets((0, 4))


def test_padding_repeats_the_last_row_and_unpadding_restores_shapes():
    x = torch.arange(6.0).reshape(3, 2)
    padded = _pad((x, None, 7), 3, 4)
    assert padded[0].shape == (4, 2) and torch.equal(padded[0][3], x[2]) and padded[1:] == (None, 7)
    assert torch.equal(_unpad(padded, 3, 4)[0], x)


def _block(block, hidden, scale):
    return block(hidden) * scale


def test_compiled_blocks_share_graphs_by_variant_and_fall_back_after_freeze():
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(8, 8) for _ in range(3)]
    compiled = CompiledBlocks(_block, BatchBuckets((2, 4)), lambda block: "linear")
    with torch.inference_mode():
        for rows in (1, 2, 3):
            x = torch.randn(rows, 8)
            for block in blocks:
                torch.testing.assert_close(compiled(block, x, 2.0), block(x) * 2.0)
        assert compiled.stats.graphs == 2  # buckets 2 and 4, shared by the three blocks
        assert compiled.stats.padded_rows == 3 * (1 + 0 + 1)
        compiled.freeze()
        wide = torch.randn(3, 8)
        torch.testing.assert_close(compiled(blocks[0], wide, 3.0), blocks[0](wide) * 3.0)  # new scale: eager
        torch.testing.assert_close(compiled(blocks[0], torch.randn(5, 8), 2.0).shape, torch.Size([5, 8]))
    assert compiled.stats.graphs == 2 and compiled.stats.eager_calls == 2


def test_compiled_engine_warms_up_every_bucket_and_serves_lora_and_cache_rows(tiny_sd3_dir, tmp_path):
    """Warm-up compiles buckets x sizes x block variants and nothing after; LoRA steps run eager, cached
    rows skip the compiled blocks, and each image equals the eager engine's."""
    from test_lora import _make_lora

    lora_dir = tmp_path / "loras"
    _make_lora(tiny_sd3_dir, lora_dir, "style", seed=1)
    options = dict(max_sequence_length=16, max_batch_rows=8, lora_dir=str(lora_dir))
    compiled = Engine.from_pretrained(tiny_sd3_dir, compile=True, compile_buckets=(2, 8), **options)
    stats = compiled.core.runner.compiled.stats
    assert stats.graphs == 2 * 2  # 2 buckets x (joint block, last block) at the default size
    eager = Engine.from_pretrained(tiny_sd3_dir, **options)
    params = [GenerationParams("a cat", num_inference_steps=6, seed=1),
              GenerationParams("a dog", num_inference_steps=6, seed=2, lora="style"),
              GenerationParams("a red circle", num_inference_steps=6, seed=3, cache="glideserve:2"),
              GenerationParams("a cat", num_inference_steps=6, seed=4, guidance_scale=1.0)]
    for got, want in zip(compiled.generate(params, progress=False), eager.generate(params, progress=False)):
        diff = np.abs(np.asarray(got.image, dtype=int) - np.asarray(want.image, dtype=int)).max()
        assert diff <= 2, f"{got.request_id} differs from the eager engine by {diff}"
    assert stats.graphs == 4, "serving compiled new graphs after warm-up"
    assert stats.rows > 0 and stats.eager_calls == 0
