"""One ledger of memory claims against a budget: feature caches now, adapters and optimizer state later."""

from __future__ import annotations


class MemoryLedger:
    """Bytes claimed per owner (a request id, an adapter name) against ``budget_bytes``.

    A claim either fits whole or is refused; ``release`` returns what the owner held.
    The scheduler claims when it admits a request and releases when the request no
    longer needs the memory (finished denoising, aborted, dropped or failed), so
    ``used`` is always the sum of live claims and never exceeds the budget.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._claims: dict[str, int] = {}
        self.refused = 0

    def claim(self, owner: str, nbytes: int) -> bool:
        if owner in self._claims:
            raise ValueError(f"{owner!r} already holds a claim")
        if nbytes > self.free:
            self.refused += 1
            return False
        self._claims[owner] = nbytes
        return True

    def claim_over_budget(self, owner: str, nbytes: int) -> None:
        """Record a claim the budget cannot hold: for an owner that must exist whatever the budget
        (the only resident model, larger than a weights budget); ``free`` then goes negative."""
        if owner in self._claims:
            raise ValueError(f"{owner!r} already holds a claim")
        self._claims[owner] = nbytes

    def release(self, owner: str) -> int:
        return self._claims.pop(owner, 0)

    def holds(self, owner: str) -> bool:
        return owner in self._claims

    @property
    def used(self) -> int:
        return sum(self._claims.values())

    @property
    def free(self) -> int:
        return self.budget_bytes - self.used

    def __len__(self) -> int:
        return len(self._claims)
