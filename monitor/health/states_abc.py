"""Health states shared by replicas: the store interface and the row that crosses it.

Only the replica that probes an instance writes its state, and only when the state (or the
count towards the next change) moves, so writes are rare; every replica reads them back
and shows the same health. Implementations live in `monitor/health/stores/states_*.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from registry import HealthState

Key = tuple[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredHealth:
    """One instance's probe state machine as its prober left it (monitor/health/book.py's
    Tracker without what each replica computes itself: maintenance, lapses, suppression)."""

    service: str
    instance: str
    state: HealthState
    successes: int
    failures: int
    reason: str
    last_probe: str | None  # JSON: the last result without its body, and its verdict

    @property
    def key(self) -> Key:
        return (self.service, self.instance)


class HealthStateStore(Protocol):
    async def open(self) -> None:
        """Create the table if need be."""
        ...

    async def save(self, states: Sequence[StoredHealth], gone: Sequence[Key]) -> None:
        """Upsert `states` and delete `gone` in one transaction, and tell the other replicas
        which keys changed."""
        ...

    async def load(self, keys: Sequence[Key]) -> list[StoredHealth]:
        """The stored states of `keys` (those that have one)."""
        ...

    async def changed(self, since: float | None) -> tuple[list[StoredHealth], float]:
        """States written after `since` (all with None), and the store's clock now: the
        next call's `since`, less a margin for writes that commit late."""
        ...
