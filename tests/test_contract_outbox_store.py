"""The OutboxStore contract, run against every implementation (notify/abc.py): deliveries
read back by owner, a claim holds only while the row is the owner's, a dead owner's rows
are adopted once even by owners adopting at once, the same news added once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor.notify import Delivery, OutboxStore, SqliteOutboxStore
from monitor.notify.abc import DeliveryTaken, OncePer
from monitor.notify.stores.postgres import PgOutboxStore
from registry import StoreUnavailable

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[OutboxStore]] = {
    "sqlite": sqlite_factory(SqliteOutboxStore),
    "postgres": postgres_factory(PgOutboxStore),
}

ME = "replica-a/1"


@pytest.fixture
def factory(backend: str) -> Factory[OutboxStore]:
    return factory_for(FACTORIES, backend)


@pytest.fixture
async def backing(
    factory: Factory[OutboxStore], tmp_path: Path
) -> AsyncIterator[Backing[OutboxStore]]:
    async with factory(tmp_path) as opened:
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
    await store.save(delivery("d1", 12.5, attempts=2), ME)
    assert await store.load(ME) == [delivery("d1", 12.5, attempts=2)]


async def test_load_is_by_due_time(store: OutboxStore) -> None:
    for id_, due in (("late", 30.0), ("early", 10.0), ("middle", 20.0)):
        await store.save(delivery(id_, due), ME)
    assert [d.id for d in await store.load(ME)] == ["early", "middle", "late"]


async def test_load_returns_the_owners_deliveries_only(store: OutboxStore) -> None:
    await store.save(delivery("mine", 10.0), ME)
    await store.save(delivery("theirs", 5.0), "replica-b/1")
    assert [d.id for d in await store.load(ME)] == ["mine"]
    assert [d.id for d in await store.load("replica-b/1")] == ["theirs"]
    assert await store.load("replica-a/0") == []  # an earlier life of the same replica


def once(fingerprint: str, now: float, subject: str = "health.changed pay/p1") -> OncePer:
    return OncePer(subject=subject, fingerprint=fingerprint, now=now, interval=300.0)


async def test_add_stores_news_and_refuses_the_same_state_within_the_interval(
    store: OutboxStore,
) -> None:
    assert await store.add(delivery("d1", 1000.0), ME, once=once("critical", 1000.0))
    # the same state again, from this owner or another: already sent
    assert not await store.add(delivery("d2", 1100.0), ME, once=once("critical", 1100.0))
    assert not await store.add(delivery("d3", 1299.0), "b/1", once=once("critical", 1299.0))
    # a change, another subject, or the same state once the interval is over: news
    assert await store.add(delivery("d4", 1300.0), ME, once=once("passing", 1300.0))
    other = once("passing", 1300.0, subject="health.changed pay/p2")
    assert await store.add(delivery("d5", 1300.0), ME, once=other)
    assert await store.add(delivery("d6", 1600.0), ME, once=once("passing", 1600.0))
    assert [d.id for d in await store.load(ME)] == ["d1", "d4", "d5", "d6"]
    assert await store.load("b/1") == []


async def test_two_owners_adding_the_same_news_at_once_store_it_once(
    factory: Factory[OutboxStore], tmp_path: Path
) -> None:
    """Two replicas probing one instance during a handover both see it go critical."""
    async with factory(tmp_path) as first, factory(tmp_path) as second:
        await first.store.create_tables()
        await second.store.create_tables()
        for round_ in range(20):
            now = 1000.0 + 1000 * round_  # each round a new interval
            added = await asyncio.gather(
                first.store.add(delivery(f"a{round_}", now), "a/1", once=once("critical", now)),
                second.store.add(delivery(f"b{round_}", now), "b/1", once=once("critical", now)),
            )
            assert sorted(added) == [False, True]
        stored = await first.store.load("a/1") + await first.store.load("b/1")
    assert len(stored) == 20


async def test_save_under_the_same_id_replaces(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0), ME)
    await store.save(delivery("d1", 40.0, attempts=3), ME)
    assert await store.load(ME) == [delivery("d1", 40.0, attempts=3)]


async def test_delete_forgets_one_and_ignores_unknown_ids(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0), ME)
    await store.save(delivery("d2", 20.0), ME)
    await store.delete("d1")
    await store.delete("never-stored")
    assert [d.id for d in await store.load(ME)] == ["d2"]


async def test_create_tables_twice_keeps_the_deliveries(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0), ME)
    await store.create_tables()
    assert [d.id for d in await store.load(ME)] == ["d1"]


async def test_deliveries_survive_a_reopen(factory: Factory[OutboxStore], tmp_path: Path) -> None:
    async with factory(tmp_path) as opened:
        first = opened.store
        await first.create_tables()
        await first.save(delivery("d1", 10.0), ME)
    async with factory(tmp_path) as opened:
        second = opened.store
        await second.create_tables()
        assert await second.load(ME) == [delivery("d1", 10.0)]


async def test_a_claim_by_the_owner_stores_attempts_and_due(store: OutboxStore) -> None:
    await store.save(delivery("d1", 10.0), ME)
    await store.claim(delivery("d1", 70.0, attempts=2), ME)
    assert await store.load(ME) == [delivery("d1", 70.0, attempts=2)]


async def test_adopt_hands_the_dead_owners_rows_to_the_adopter(store: OutboxStore) -> None:
    await store.save(delivery("d1", 20.0, attempts=2), "dead/1")
    await store.save(delivery("d2", 10.0), "dead/2")
    await store.save(delivery("alive", 5.0), "alive/1")
    adopted = await store.adopt(ME, ["dead/1", "dead/2"])
    assert adopted == [delivery("d2", 10.0), delivery("d1", 20.0, attempts=2)]  # same ids
    assert await store.load(ME) == adopted
    assert await store.load("dead/1") == []
    assert [d.id for d in await store.load("alive/1")] == ["alive"]
    assert await store.adopt(ME, ["dead/1", "dead/2"]) == []  # nothing left to adopt


async def test_the_old_owner_can_neither_claim_nor_save_an_adopted_row(
    store: OutboxStore,
) -> None:
    """A replica taken for dead that wakes up must not send what another now sends."""
    await store.save(delivery("d1", 10.0), "paused/1")
    await store.adopt(ME, ["paused/1"])
    with pytest.raises(DeliveryTaken):
        await store.claim(delivery("d1", 10.0, attempts=1), "paused/1")
    with pytest.raises(DeliveryTaken):
        await store.save(delivery("d1", 60.0, attempts=1), "paused/1")
    assert await store.load(ME) == [delivery("d1", 10.0)]


async def test_a_claim_on_a_deleted_row_is_refused_and_stores_nothing(
    store: OutboxStore,
) -> None:
    """Sent and deleted by its adopter: claiming it again must not bring it back."""
    await store.save(delivery("d1", 10.0), ME)
    await store.delete("d1")
    with pytest.raises(DeliveryTaken):
        await store.claim(delivery("d1", 10.0, attempts=1), ME)
    assert await store.load(ME) == []


async def test_two_owners_adopting_at_once_take_each_delivery_once(
    factory: Factory[OutboxStore], tmp_path: Path
) -> None:
    """Two replicas that see the same members die adopt over the same rows at once."""
    dead = ["dead/1", "dead/2"]
    returned: list[str] = []
    async with factory(tmp_path) as first, factory(tmp_path) as second:
        await first.store.create_tables()
        await second.store.create_tables()
        for round_ in range(5):
            ids = [f"d{round_}-{i}" for i in range(100)]
            await asyncio.gather(
                *(first.store.save(delivery(id_, 1.0), dead[i % 2]) for i, id_ in enumerate(ids))
            )
            adopted = await asyncio.gather(
                first.store.adopt("a/1", dead), second.store.adopt("b/1", dead)
            )
            returned += [d.id for batch in adopted for d in batch]
        held_a = [d.id for d in await first.store.load("a/1")]
        held_b = [d.id for d in await second.store.load("b/1")]
    everything = {f"d{round_}-{i}" for round_ in range(5) for i in range(100)}
    assert sorted(returned) == sorted(everything)  # each once, by one adopter or the other
    assert sorted(held_a + held_b) == sorted(everything)


async def test_a_broken_storage_refuses_every_write(
    backing: Backing[OutboxStore],
) -> None:
    """The notifier goes on from memory on StoreUnavailable, and only on that."""
    await backing.store.save(delivery("d1", 10.0), ME)
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.add(delivery("d2", 20.0), ME, once=once("critical", 20.0))
    with pytest.raises(StoreUnavailable):
        await backing.store.save(delivery("d2", 20.0), ME)
    with pytest.raises(StoreUnavailable):
        await backing.store.claim(delivery("d1", 20.0, attempts=1), ME)
    with pytest.raises(StoreUnavailable):
        await backing.store.delete("d1")
    with pytest.raises(StoreUnavailable):
        await backing.store.adopt(ME, ["dead/1"])


async def test_owners_names_every_owner_with_a_stored_delivery(store: OutboxStore) -> None:
    assert await store.owners() == set()
    await store.save(delivery("d1", 1.0), ME)
    await store.save(delivery("d2", 2.0), "replica-b/2")
    await store.save(delivery("d3", 3.0), "replica-b/2")
    assert await store.owners() == {ME, "replica-b/2"}
    await store.delete("d1")
    assert await store.owners() == {"replica-b/2"}
