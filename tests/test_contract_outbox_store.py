"""The OutboxStore contract, run against every implementation (notify/abc.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor.notify import Delivery, OutboxStore, SqliteOutboxStore
from registry import StoreUnavailable

from .contracts import Backing, Factory, factory_for, sqlite_factory

FACTORIES: dict[str, Factory[OutboxStore]] = {"sqlite": sqlite_factory(SqliteOutboxStore)}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[OutboxStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


@pytest.fixture
def store(backing: Backing[OutboxStore]) -> OutboxStore:
    return backing.store


def delivery(id_: str, due: float, attempts: int = 0) -> Delivery:
    return Delivery(
        id=id_, name="ops", topic="health.changed", body=b'{"a":1}', attempts=attempts, due=due
    )


async def test_a_saved_delivery_loads_back_whole(store: OutboxStore) -> None:
    await store.save(delivery("d1", 12.5, attempts=2))
    assert await store.load() == [delivery("d1", 12.5, attempts=2)]


async def test_load_is_by_due_time(store: OutboxStore) -> None:
    for id_, due in (("late", 30.0), ("early", 10.0), ("middle", 20.0)):
        await store.save(delivery(id_, due))
    assert [d.id for d in await store.load()] == ["early", "middle", "late"]


async def test_save_under_the_same_id_replaces(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0))
    await store.save(delivery("d1", 40.0, attempts=3))
    assert await store.load() == [delivery("d1", 40.0, attempts=3)]


async def test_delete_forgets_one_and_ignores_unknown_ids(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0))
    await store.save(delivery("d2", 20.0))
    await store.delete("d1")
    await store.delete("never-stored")
    assert [d.id for d in await store.load()] == ["d2"]


async def test_create_tables_twice_keeps_the_deliveries(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0))
    await store.create_tables()
    assert [d.id for d in await store.load()] == ["d1"]


async def test_deliveries_survive_a_reopen(tmp_path: Path) -> None:
    for factory in FACTORIES.values():
        async with factory(tmp_path) as opened:
            first = opened.store
            await first.create_tables()
            await first.save(delivery("d1", 10.0))
        async with factory(tmp_path) as opened:
            second = opened.store
            await second.create_tables()
            assert await second.load() == [delivery("d1", 10.0)]


async def test_a_broken_storage_refuses_saves_and_deletes(backing: Backing[OutboxStore]) -> None:
    """The notifier goes on from memory on StoreUnavailable, and only on that."""
    await backing.store.save(delivery("d1", 10.0))
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.save(delivery("d2", 20.0))
    with pytest.raises(StoreUnavailable):
        await backing.store.delete("d1")
