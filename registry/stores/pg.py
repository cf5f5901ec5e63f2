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


class Blind:
    """A write that reads nothing back (no rows, no rowcount): a batch of such writes and
    their riders is sent as one pipeline (PgDatabase), one round trip where each write
    waited for its own answer before the next was sent (the writer thread's critical
    path). In a pipeline a rowcount is not yet known when read: mark only writes that
    never look."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Connection], None]) -> None:
        self.fn = fn

    def __call__(self, conn: Connection) -> None:
        self.fn(conn)


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
