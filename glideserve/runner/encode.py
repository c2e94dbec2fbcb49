"""Batched text encoding with an LRU cache of prompt embeddings."""

from __future__ import annotations

from collections import OrderedDict

from glideserve.runner.families.base import Cond, DenoiserFamily


class PromptEncoder:
    """Encodes the distinct prompts of newly admitted requests in one batch.

    Embeddings are cached per prompt text (least recently used evicted beyond
    ``capacity``); ``hits``/``misses`` count lookups for metrics.
    """

    def __init__(self, family: DenoiserFamily, capacity: int):
        self.family = family
        self.capacity = capacity
        self._cache: OrderedDict[str, Cond] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, texts: list[str]) -> dict[str, Cond]:
        result: dict[str, Cond] = {}
        missing = []
        for text in dict.fromkeys(texts):
            if text in self._cache:
                self._cache.move_to_end(text)
                result[text] = self._cache[text]
                self.hits += 1
            else:
                missing.append(text)
        if missing:
            self.misses += len(missing)
            for text, cond in zip(missing, self.family.encode(missing)):
                result[text] = cond
                self._cache[text] = cond
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return result

    def clear(self) -> None:
        """Forget every cached embedding (counters are kept)."""
        self._cache.clear()
