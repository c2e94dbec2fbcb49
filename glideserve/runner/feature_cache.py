"""Per-request feature caches and the per-request view of one batched forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glideserve.cache.policy import CachePolicy, StepKind


@dataclass(eq=False)
class FeatureCache:
    """What one request stored on its last full step(s), and its change statistics.

    ``tensors`` hold only that request's rows (cloned, never views into a batch tensor,
    so a cache never keeps a whole batch alive); ``blocks`` holds per-block tensors for
    policies that reuse inside every block (FORA); ``stats`` holds scalars (accumulated
    change, step indices). Dropping the object frees everything.
    """

    policy: CachePolicy
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether a full step has stored what a cached step needs."""
        return bool(self.tensors or self.blocks)

    def nbytes(self) -> int:
        tensors = [*self.tensors.values(), *(t for block in self.blocks for t in block)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class RowGroup:
    """One request's rows inside a group forward: ``start``/``rows`` locate them in the
    batch; ``kind`` is the scheduler's decision; ``cache`` is None when the request
    caches nothing; ``step_index`` counts the request's steps taken before this one."""

    start: int
    rows: int
    kind: StepKind
    cache: FeatureCache | None
    step_index: int

    @property
    def stop(self) -> int:
        return self.start + self.rows

    @property
    def policy_kind(self) -> str:
        return "none" if self.cache is None else self.cache.policy.kind


def row_index(groups: list[RowGroup], selected: list[int], device: torch.device) -> torch.Tensor:
    """Batch row indices of the selected groups, in order."""
    return torch.cat([torch.arange(groups[i].start, groups[i].stop, device=device) for i in selected])


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean absolute change relative to the previous tensor's mean magnitude (TeaCache, First-Block-Cache)."""
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))
