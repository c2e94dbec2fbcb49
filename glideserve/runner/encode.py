"""Batched text encoding with an LRU cache of prompt embeddings, keyed on text and text-encoder adapters."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

from glideserve.runner.families.base import Cond, DenoiserFamily

# A prompt as the text encoders see it: its text and the text-encoder LoRAs applied to it ((adapter, scale), ...).
PromptKey = tuple[str, tuple]


class PromptEncoder:
    """Encodes the distinct prompts of newly admitted requests, one batch per set of text-encoder adapters.

    Embeddings are cached per ``(text, adapters)`` key (least recently used evicted beyond
    ``capacity``): a prompt encoded under a text-encoder LoRA is never served to a request
    without it. ``hits``/``misses`` count lookups for metrics.
    """

    def __init__(self, family: DenoiserFamily, capacity: int):
        self.family = family
        self.capacity = capacity
        self._cache: OrderedDict[PromptKey, Cond] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, keys: list[PromptKey]) -> dict[PromptKey, Cond]:
        result: dict[PromptKey, Cond] = {}
        missing: dict[tuple, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key in self._cache:
                self._cache.move_to_end(key)
                result[key] = self._cache[key]
                self.hits += 1
            else:
                missing.setdefault(key[1], []).append(key[0])
        for adapters, texts in missing.items():
            self.misses += len(texts)
            rows = self.family.text_lora_rows
            scope = rows.rows([adapters] * len(texts), self.family.device) if adapters else nullcontext()
            with scope:
                conds = self.family.encode(texts)
            for text, cond in zip(texts, conds):
                result[(text, adapters)] = cond
                self._cache[(text, adapters)] = cond
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return result

    def clear(self) -> None:
        """Forget every cached embedding (counters are kept)."""
        self._cache.clear()
