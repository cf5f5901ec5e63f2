"""What every PostgreSQL store takes (monitor/storage/postgres.py's PgDatabase is one): reads,
durable group-committed writes, and versioned migrations of the store's own tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:  # psycopg (22 MB) is imported only by the PostgreSQL stores themselves
    import psycopg

    Connection = psycopg.Connection[Any]
else:
    Connection = Any


class PgTransactor(Protocol):
    async def read(self, fn: Callable[[Connection], T]) -> T: ...

    async def write(self, fn: Callable[[Connection], T], *, ride: bool = True) -> T:
        """`ride=False`: bookkeeping (a claim), never the change a request's audit record
        goes with (monitor/storage/riders.py)."""
        ...

    async def migrate(self, component: str, steps: Sequence[str]) -> None:
        """Apply the steps of `component` not yet applied (append-only: never edit a step,
        add one); refuse a database whose version is newer than len(steps)."""
        ...
