"""The ResourceStore contract, run against every implementation (workflows/abc.py): what
the resource pool (workflows/resources.py) relies on, through the Protocol only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from registry import StoreUnavailable
from workflows.abc import Hold, Overbooked, ResourceStore
from workflows.stores.postgres_resources import PgResourceStore
from workflows.stores.sqlite_resources import SqliteResourceStore

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[ResourceStore]] = {
    "sqlite": sqlite_factory(SqliteResourceStore),
    "postgres": postgres_factory(PgResourceStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[ResourceStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


@pytest.fixture
def store(backing: Backing[ResourceStore]) -> ResourceStore:
    return backing.store


def hold(process: str, seq: int, *, step: str = "reserve", held: bool = False) -> Hold:
    return Hold(
        process=process, step=step, resource="funds", key="P-7", units=1, seq=seq, held=held
    )


async def test_waiters_come_back_in_queue_order(store: ResourceStore) -> None:
    for process, seq in (("c", 3), ("a", 1), ("b", 2)):
        await store.wait(hold(process, seq))
    assert [h.process for h in await store.holds()] == ["a", "b", "c"]
    assert await store.holds() == [hold("a", 1), hold("b", 2), hold("c", 3)]


async def test_a_handover_releases_and_grants_in_one_write(store: ResourceStore) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await store.wait(hold("b", 2))
    await store.wait(hold("c", 3))
    await store.settle(released=["a"], granted=[hold("b", 2, held=True)])
    assert await store.holds() == [hold("b", 2, held=True), hold("c", 3)]


async def test_a_waiting_row_never_takes_back_a_grant(store: ResourceStore) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await store.wait(hold("a", 1))  # written late: the grant stays
    assert await store.holds() == [hold("a", 1, held=True)]


async def test_one_row_per_process_and_step(store: ResourceStore) -> None:
    await store.wait(hold("a", 1))
    await store.wait(replace(hold("a", 5), units=3))
    await store.settle(granted=[hold("a", 1, held=True), hold("a", 2, step="pay", held=True)])
    assert await store.holds() == [hold("a", 1, held=True), hold("a", 2, step="pay", held=True)]


async def test_a_release_takes_every_row_of_the_process(store: ResourceStore) -> None:
    await store.settle(granted=[hold("a", 1, held=True), hold("a", 2, step="pay", held=True)])
    await store.wait(hold("b", 3))
    await store.settle(released=["a"])
    assert await store.holds() == [hold("b", 3)]


async def test_a_waiter_that_leaves_takes_only_its_row(store: ResourceStore) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await store.wait(hold("a", 2, step="pay"))
    await store.settle(left=[("a", "pay")])
    assert await store.holds() == [hold("a", 1, held=True)]


async def test_a_global_hold_has_no_key(store: ResourceStore) -> None:
    global_hold = replace(hold("a", 1, held=True), key=None)
    await store.settle(granted=[global_hold])
    assert await store.holds() == [global_hold]


async def test_holds_and_waiters_outlive_the_store_that_wrote_them(
    backend: str, tmp_path: Path, store: ResourceStore
) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await store.wait(hold("b", 2))
    async with factory_for(FACTORIES, backend)(tmp_path) as reopened:  # a restart
        await reopened.store.create_tables()
        assert await reopened.store.holds() == [hold("a", 1, held=True), hold("b", 2)]


async def test_a_checked_grant_that_does_not_fit_writes_nothing(store: ResourceStore) -> None:
    funds = {"funds": 2}
    await store.settle(granted=[hold("a", 1, held=True), hold("b", 2, held=True)], capacities=funds)
    await store.wait(hold("c", 3))
    with pytest.raises(Overbooked) as refused:
        await store.settle(
            released=["x"],
            left=[("c", "reserve")],
            granted=[hold("d", 4, held=True)],
            capacities=funds,
        )
    assert refused.value.holds == [hold("d", 4, held=True)]
    assert await store.holds() == [hold("a", 1, held=True), hold("b", 2, held=True), hold("c", 3)]
    # A grant stored again is not counted twice; another key, or the global pool, is apart.
    elsewhere = replace(hold("e", 5, held=True), key="P-8")
    global_hold = replace(hold("f", 6, held=True), key=None, units=2)
    await store.settle(granted=[hold("a", 1, held=True), elsewhere, global_hold], capacities=funds)
    # Units freed in the same settle make room for the grant after them.
    await store.settle(released=["a"], granted=[hold("c", 3, held=True)], capacities=funds)
    assert await store.holds() == [
        hold("b", 2, held=True),
        hold("c", 3, held=True),
        elsewhere,
        global_hold,
    ]


async def test_two_stores_over_one_database_never_grant_beyond_capacity(
    backend: str, tmp_path: Path, store: ResourceStore
) -> None:
    """Two daemons (replicas) granting one key's last units at once: three fit, not more."""
    async with factory_for(FACTORIES, backend)(tmp_path) as other:
        stores = [store, other.store]
        outcomes = await asyncio.gather(
            *(
                stores[n % 2].settle(granted=[hold(f"p{n}", n, held=True)], capacities={"funds": 3})
                for n in range(20)
            ),
            return_exceptions=True,
        )
        assert [o for o in outcomes if not isinstance(o, Overbooked)] == [None] * 3
        held = [h for h in await other.store.holds() if h.held]
        assert sum(h.units for h in held) == 3


async def test_a_broken_storage_refuses_with_store_unavailable(
    backing: Backing[ResourceStore], store: ResourceStore
) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await store.settle(released=["a"], granted=[hold("b", 2, held=True)])
    with pytest.raises(StoreUnavailable):
        await store.wait(hold("c", 3))
