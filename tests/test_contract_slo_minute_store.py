"""The SloMinuteStore contract, run against every implementation (slo/abc.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor.slo import SloMinuteStore, SqliteSloMinuteStore
from monitor.slo.stores.postgres import PgSloMinuteStore
from registry import StoreUnavailable

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[SloMinuteStore]] = {
    "sqlite": sqlite_factory(SqliteSloMinuteStore),
    "postgres": postgres_factory(PgSloMinuteStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[SloMinuteStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


@pytest.fixture
def store(backing: Backing[SloMinuteStore]) -> SloMinuteStore:
    return backing.store


async def test_added_minutes_read_back(store: SloMinuteStore) -> None:
    await store.add([("pay", "avail", 100, 5, 6), ("pay", "avail", 101, 3, 3)])
    assert sorted(await store.minutes("pay", "avail", 0)) == [(100, 5, 6), (101, 3, 3)]


async def test_create_tables_twice_keeps_the_minutes(store: SloMinuteStore) -> None:
    await store.add([("pay", "avail", 100, 5, 6)])
    await store.create_tables()
    assert await store.minutes("pay", "avail", 0) == [(100, 5, 6)]


async def test_a_minute_added_again_is_summed(store: SloMinuteStore) -> None:
    await store.add([("pay", "avail", 100, 5, 6)])
    await store.add([("pay", "avail", 100, 1, 2)])
    assert await store.minutes("pay", "avail", 0) == [(100, 6, 8)]


async def test_minutes_are_per_service_and_slo_from_since_on(store: SloMinuteStore) -> None:
    await store.add(
        [
            ("pay", "avail", 99, 1, 1),
            ("pay", "avail", 100, 2, 2),
            ("pay", "latency", 100, 3, 3),
            ("shop", "avail", 100, 4, 4),
        ]
    )
    assert await store.minutes("pay", "avail", 100) == [(100, 2, 2)]
    assert await store.minutes("pay", "latency", 0) == [(100, 3, 3)]
    assert await store.minutes("nobody", "avail", 0) == []


async def test_prune_forgets_minutes_before_the_boundary_only(store: SloMinuteStore) -> None:
    await store.add([("pay", "avail", m, 1, 1) for m in (98, 99, 100, 101)])
    await store.prune(100)
    assert sorted(await store.minutes("pay", "avail", 0)) == [(100, 1, 1), (101, 1, 1)]


async def test_minutes_survive_a_reopen(backend: str, tmp_path: Path) -> None:
    factory = factory_for(FACTORIES, backend)
    async with factory(tmp_path) as opened:
        first = opened.store
        await first.create_tables()
        await first.add([("pay", "avail", 100, 5, 6)])
    async with factory(tmp_path) as opened:
        second = opened.store
        await second.create_tables()
        assert await second.minutes("pay", "avail", 0) == [(100, 5, 6)]


async def test_a_broken_storage_refuses_to_add(backing: Backing[SloMinuteStore]) -> None:
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.add([("pay", "avail", 100, 5, 6)])
