"""The ResourceStore contract, run against every implementation (workflows/abc.py): what
the resource pool (workflows/resources.py) relies on, through the Protocol only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from registry import StoreUnavailable
from workflows.abc import Hold, ResourceStore
from workflows.stores.sqlite_resources import SqliteResourceStore

from .contracts import Backing, Factory, factory_for, sqlite_factory

FACTORIES: dict[str, Factory[ResourceStore]] = {"sqlite": sqlite_factory(SqliteResourceStore)}


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


async def test_a_broken_storage_refuses_with_store_unavailable(
    backing: Backing[ResourceStore], store: ResourceStore
) -> None:
    await store.settle(granted=[hold("a", 1, held=True)])
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await store.settle(released=["a"], granted=[hold("b", 2, held=True)])
    with pytest.raises(StoreUnavailable):
        await store.wait(hold("c", 3))
