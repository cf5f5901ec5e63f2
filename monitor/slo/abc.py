"""The SLO minute store: closed minutes of every SLO ledger, so a restart or a
reload restores the ledgers from what was counted before."""

from __future__ import annotations

from typing import Protocol


class SloMinuteStore(Protocol):
    """Good and valid counts per (service, SLO, minute since the epoch).

    A failed `add` raises, and the book keeps the minutes for its next flush."""

    async def create_tables(self) -> None:
        """Idempotent."""
        ...

    async def minutes(self, service: str, slo: str, since: int) -> list[tuple[int, int, int]]:
        """(minute, good, valid) of one SLO from minute `since` on, in no promised order."""
        ...

    async def add(self, rows: list[tuple[str, str, int, int, int]]) -> None:
        """(service, slo, minute, good, valid) rows, in one transaction; a minute already
        stored gets these counts added to its own."""
        ...

    async def prune(self, before_minute: int) -> None:
        """Forget every minute before `before_minute`."""
        ...
