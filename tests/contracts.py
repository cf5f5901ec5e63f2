"""What the store contract tests share: a real database per implementation, and a way to
make it refuse writes.

Each tests/test_contract_*.py has FACTORIES, one entry per implementation, each an async
context manager over a directory that yields a `Backing` with the store in it
(`"sqlite": sqlite_factory(SqliteXStore)`). The tests use
only the store's Protocol, never its tables; issue 17 adds a "postgres" entry beside each
"sqlite" one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from monitor.storage import Database

S = TypeVar("S")


@dataclass(kw_only=True)
class Backing(Generic[S]):
    """A store under test, and what the contract does to the storage behind it."""

    store: S
    # Breaks the storage underneath the open store: later writes raise StoreUnavailable.
    break_storage: Callable[[], Awaitable[None]]


Factory = Callable[[Path], AbstractAsyncContextManager[Backing[S]]]


@asynccontextmanager
async def sqlite_database(tmp_path: Path) -> AsyncIterator[Database]:
    """The daemon's real SQLite file (WAL, the writer thread) in `tmp_path`; the same path
    opened twice reads back what the first one wrote."""
    database = Database(tmp_path / "contract.db")
    await database.open()
    try:
        yield database
    finally:
        await database.close()


async def close_underneath(database: Database) -> None:
    """Closes the SQLite connection behind `database` while its writer still runs: the next
    commit fails, as when the disk or the file goes away, and writes raise StoreUnavailable."""

    def close(db: object) -> None:
        db.conn.close()  # type: ignore[attr-defined]

    await database.read(close)


def sqlite_factory(make: Callable[[Database], S]) -> Factory[S]:
    """A factory of SQLite stores: `make` builds one over the daemon's Database."""

    @asynccontextmanager
    async def backing(tmp_path: Path) -> AsyncIterator[Backing[S]]:
        async with sqlite_database(tmp_path) as database:
            yield Backing(store=make(database), break_storage=lambda: close_underneath(database))

    return backing


def factory_for(factories: dict[str, Factory[S]], backend: str) -> Factory[S]:
    """Every backend of conftest.BACKENDS must implement every store: a missing one fails."""
    factory = factories.get(backend)
    if factory is None:
        pytest.fail(f"no {backend} implementation of this store")
    return factory
