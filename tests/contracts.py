"""What the store contract tests share: a real database per implementation, and a way to
make it refuse writes.

Each tests/test_contract_*.py has FACTORIES, one entry per implementation, each an async
context manager over a directory that yields a `Backing` with the store in it
(`"sqlite": sqlite_factory(SqliteXStore)`). The tests use
only the store's Protocol, never its tables; each has a "postgres" entry beside the
"sqlite" one, on a new database of the run's own PostgreSQL (tests/pg.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import pytest

from monitor.storage import Database
from monitor.storage.postgres import PgDatabase

if TYPE_CHECKING:
    from .pg import PostgresCluster

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


@asynccontextmanager
async def postgres_database(url: str) -> AsyncIterator[PgDatabase]:
    """The daemon's PostgreSQL handle on `url`; opened twice, it reads back what it wrote."""
    database = PgDatabase(url)
    await database.open()
    try:
        yield database
    finally:
        await database.close()


def postgres_factory(make: Callable[[PgDatabase], S]) -> Factory[S]:
    """A factory of PostgreSQL stores: `make` builds one over the daemon's PgDatabase, on a
    database of its own (one per directory, so a test that opens the store twice in the same
    directory sees the same data)."""
    urls: dict[Path, str] = {}

    @asynccontextmanager
    async def backing(tmp_path: Path) -> AsyncIterator[Backing[S]]:
        cluster = _POSTGRES.get("cluster")
        if cluster is None:
            pytest.fail("the postgres contract needs the `postgres` fixture (tests/conftest.py)")
        if tmp_path not in urls:
            urls[tmp_path] = cluster.database()
        url = urls[tmp_path]
        async with postgres_database(url) as database:

            async def break_storage() -> None:
                cluster.refuse_connections(url)

            yield Backing(store=make(database), break_storage=break_storage)

    return backing


# The run's cluster, put here by the `backend` fixture when a contract test asks for postgres.
_POSTGRES: dict[str, PostgresCluster] = {}


def factory_for(factories: dict[str, Factory[S]], backend: str) -> Factory[S]:
    """Every backend of conftest.BACKENDS must implement every store: a missing one fails."""
    factory = factories.get(backend)
    if factory is None:
        pytest.fail(f"no {backend} implementation of this store")
    return factory
