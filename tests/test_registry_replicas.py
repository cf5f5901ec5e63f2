"""The registry across replicas (DESIGN §8): two Catalogs over one PostgreSQL database, each
with its own PgDatabase, Listener and replication task, as two daemons have. A write on one
shows on the other and wakes its blocking queries; heartbeats to one keep the lease on the
other's reaper; a server crash between is caught up by the re-read after the reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from monitor.storage.postgres import Listener, PgDatabase
from registry import Catalog, Change, ChangeKind, Instance, StoreUnavailable
from registry.catalog import LEASE_SLACK
from registry.changes import Changes
from registry.stores import postgres as postgres_store
from registry.stores.postgres import CHANNEL, PgRegistryStore

from .conftest import FakeClock
from .pg import PostgresCluster


@dataclass
class Replica:
    catalog: Catalog
    store: PgRegistryStore
    heard: list[tuple[ChangeKind, str]] = field(default_factory=list)

    def ids(self, service: str = "pay") -> list[str]:
        return [status.instance.id for status in self.catalog.instances(service)]

    def lapsed(self, service: str = "pay") -> list[str]:
        return [s.instance.id for s in self.catalog.instances(service) if s.lapsed]


@contextlib.asynccontextmanager
async def replica(
    url: str,
    *,
    reaping: bool = True,
    listen: bool = True,
    follow: bool = True,
    clock: FakeClock | None = None,
    lease_slack: float | None = None,
) -> AsyncIterator[Replica]:
    """A daemon's registry: `listen` wires LISTEN (and the re-read on every connect),
    `follow` runs the replication task (heartbeat flushes and the poll)."""
    database = PgDatabase(url)
    await database.open()
    store = PgRegistryStore(database)
    slack = None if lease_slack is None else (lambda: lease_slack)
    catalog = Catalog(store, reaping=lambda: reaping, clock=clock, lease_slack=slack)
    await catalog.load()
    this = Replica(catalog, store)
    catalog.add_listener(lambda change: this.heard.append((change.kind, change.instance.id)))
    tasks = [asyncio.create_task(catalog.run_reaper())]
    if follow:
        tasks.append(asyncio.create_task(catalog.run_replication()))
    listener = Listener(url, [CHANNEL], lambda _, p: catalog.remote_changed(p), catalog.resync)
    if listen:
        listener.start()
        await asyncio.wait_for(listener.connected.wait(), 10)
    try:
        yield this
    finally:
        await listener.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await database.close()


def instance(id: str = "p1", **fields: object) -> Instance:
    now = time.time()
    defaults: dict[str, object] = {"url": f"http://10.0.0.1/{id}", "updated_at": now}
    return Instance(service="pay", id=id, **{**defaults, **fields})  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.02)


async def retried(write: Callable[[], Awaitable[object]]) -> None:
    for _ in range(100):
        try:
            await write()
            return
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    raise AssertionError("the write was refused for 10 s")


async def test_a_registration_on_one_replica_shows_on_the_other_and_wakes_its_queries(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    async with replica(url) as a, replica(url) as b:
        before = b.catalog.service_index("pay")
        woken = asyncio.create_task(b.catalog.wait_for_change("pay", before, 30))
        await a.catalog.register(instance("p1", tags=("blue",)))
        assert await asyncio.wait_for(woken, 10) > before
        assert b.ids() == ["p1"]
        assert b.catalog.instances("pay")[0].instance.tags == ("blue",)
        assert b.heard == [(ChangeKind.REGISTERED, "p1")]
        # An index a client got from `a` is no index from the future on `b`.
        assert b.catalog.index >= a.catalog.index

        await b.catalog.register(instance("p1", tags=("green",)))
        await eventually(lambda: a.catalog.instances("pay")[0].instance.tags == ("green",))
        assert a.heard[-1] == (ChangeKind.UPDATED, "p1")
        assert b.heard == [(ChangeKind.REGISTERED, "p1"), (ChangeKind.UPDATED, "p1")]


async def test_a_deregistration_on_one_replica_removes_it_on_both(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    async with replica(url) as a, replica(url) as b:
        await a.catalog.register(instance("p1"))
        await a.catalog.register(instance("p2"))
        await eventually(lambda: b.ids() == ["p1", "p2"])
        woken = asyncio.create_task(a.catalog.wait_for_change("pay", a.catalog.index, 30))
        await b.catalog.deregister("pay", "p1")
        await asyncio.wait_for(woken, 10)
        assert a.ids() == b.ids() == ["p2"]
        assert a.heard[-1] == (ChangeKind.DEREGISTERED, "p1")


async def test_heartbeats_to_one_replica_keep_the_lease_on_the_reaping_one(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    async with replica(url, reaping=False) as a, replica(url, reaping=True) as b:
        await a.catalog.register(instance("p1", ttl=0.5, deregister_after=0.5))
        await eventually(lambda: b.ids() == ["p1"])
        # Beyond what lapses and removes an unrenewed lease (ttl, the slack for a heartbeat
        # to reach the other replica, deregister_after: 3 s).
        until = time.monotonic() + 5.0
        while time.monotonic() < until:
            a.catalog.heartbeat("pay", "p1")
            assert b.lapsed() == [] and b.ids() == ["p1"]
            await asyncio.sleep(0.2)
        assert a.ids() == ["p1"]
        assert (ChangeKind.LAPSED, "p1") not in b.heard

        # Once heartbeats stop, the reaping replica removes it, on both.
        await eventually(lambda: a.ids() == b.ids() == [])
        assert (ChangeKind.LAPSED, "p1") in b.heard


async def test_a_replica_that_does_not_reap_marks_lapses_but_leaves_removal_to_the_reaper(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    async with replica(url, reaping=False) as a:
        await a.catalog.register(instance("p1", ttl=0.2, deregister_after=0.2))
        await eventually(lambda: a.lapsed() == ["p1"])
        await asyncio.sleep(1.5)  # past its removal time
        assert a.lapsed() == ["p1"]
        async with replica(url, reaping=True):
            await eventually(lambda: a.ids() == [])


async def test_without_notifications_the_poll_catches_up(postgres: PostgresCluster) -> None:
    url = postgres.database()
    async with replica(url) as a, replica(url, listen=False) as b:
        await a.catalog.register(instance("p1"))
        await eventually(lambda: b.ids() == ["p1"])
        await a.catalog.deregister("pay", "p1")
        await eventually(lambda: b.ids() == [])
        assert b.heard == [(ChangeKind.REGISTERED, "p1"), (ChangeKind.DEREGISTERED, "p1")]


async def test_a_resync_reads_back_what_was_missed(postgres: PostgresCluster) -> None:
    url = postgres.database()
    async with replica(url) as a, replica(url, listen=False, follow=False) as b:
        await a.catalog.register(instance("gone"))
        await b.catalog.resync()
        assert b.ids() == ["gone"]
        await a.catalog.deregister("pay", "gone")
        await a.catalog.register(instance("new"))
        await b.catalog.resync()
        assert b.ids() == ["new"]
        assert b.heard[1:] == [(ChangeKind.DEREGISTERED, "gone"), (ChangeKind.REGISTERED, "new")]


async def test_after_a_server_crash_replicas_reconnect_and_catch_up(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    async with replica(url) as a, replica(url) as b:
        await a.catalog.register(instance("before"))
        await eventually(lambda: b.ids() == ["before"])
        await asyncio.to_thread(postgres.restart, "immediate")
        # The first write of each may find its connection dead: refused (503), not lost.
        await retried(lambda: a.catalog.register(instance("after")))
        await retried(lambda: b.catalog.deregister("pay", "before"))
        await eventually(lambda: a.ids() == b.ids() == ["after"])


async def test_an_expiry_is_refused_when_another_replica_renewed_the_lease(
    postgres: PostgresCluster,
) -> None:
    database = PgDatabase(postgres.database())
    await database.open()
    try:
        store = PgRegistryStore(database)
        await store.load()
        await store.save(instance("p1", ttl=0.2, deregister_after=0.2), 1)
        await asyncio.sleep(0.3)
        await store.save_heartbeats([("pay", "p1")])
        other = PgRegistryStore(database)  # another replica's, which saw it lapse
        row = await other.expire("pay", "p1", 2)  # renewed 0 s ago: kept
        assert row is not None and row.instance is not None
        assert row.heartbeat_age is not None and row.heartbeat_age < 0.4
        await asyncio.sleep(0.5)
        assert await other.expire("pay", "p1", 3) is None
        assert await store.load() == ([], 3)
    finally:
        await database.close()


def test_a_change_from_another_replica_never_lowers_the_index() -> None:
    changes = Changes()
    changes.index = 10
    change = Change(kind=ChangeKind.REGISTERED, instance=instance())
    changes.announce("pay", change, at=4)
    assert changes.index == 11
    changes.announce("pay", change, at=40)
    assert changes.index == changes.service_index["pay"] == 40


async def test_each_write_notifies_its_key_only_and_a_store_skips_its_own(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    heard: list[str] = []
    listener = Listener(url, [CHANNEL], lambda _, payload: heard.append(payload), lambda: None)
    listener.start()
    database = PgDatabase(url)
    await database.open()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        mine, other = PgRegistryStore(database), PgRegistryStore(database)
        await mine.load()
        await mine.save(instance("p1", meta={"token": "s3cret"}), 1)
        await mine.delete("pay", "p1", 2)
        await eventually(lambda: len(heard) == 2)
        assert [other.notified(payload) for payload in heard] == [[("pay", "p1")]] * 2
        assert [mine.notified(payload) for payload in heard] == [[], []]
        assert not any("s3cret" in payload or "10.0.0.1" in payload for payload in heard)
    finally:
        await listener.stop()
        await database.close()


async def test_old_tombstones_are_purged_and_the_index_stays(
    postgres: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = PgDatabase(postgres.database())
    await database.open()

    def rows(conn: Any) -> int:
        return int(conn.execute("SELECT count(*) FROM registry_instances").fetchone()[0])

    try:
        store = PgRegistryStore(database)
        await store.load()
        await store.save(instance("p1"), 1)
        await store.delete("pay", "p1", 2)
        await store.delete("pay", "p2", 3)
        assert await database.read(rows) == 2  # kept for replicas that poll
        monkeypatch.setattr(postgres_store, "TOMBSTONE_KEEP", 0.0)
        await store.delete("pay", "p3", 4)
        assert await database.read(rows) == 1  # p3's own, the newest
        assert await store.load() == ([], 4)
    finally:
        await database.close()


async def test_a_replica_takes_no_lease_renewal_from_its_own_writes_read_back(
    postgres: PostgresCluster, clock: FakeClock
) -> None:
    """Its memory knows its own heartbeats by its own clock; reading them back by the
    database's clock would renew a lease that has lapsed here."""
    url = postgres.database()
    async with replica(url, reaping=False, clock=clock) as a:
        await a.catalog.register(instance("p1", ttl=10.0))
        a.catalog.heartbeat("pay", "p1")
        clock.advance(60)
        assert a.lapsed() == ["p1"]
        await a.catalog.resync()
        await asyncio.sleep(2.5)  # two polls and a heartbeat flush
        assert a.lapsed() == ["p1"]


async def test_a_lease_lapsed_by_the_reapers_own_clock_is_removed(
    postgres: PostgresCluster, clock: FakeClock
) -> None:
    """Its own heartbeats are its memory's to judge, not the database's clock."""
    url = postgres.database()
    async with replica(url, clock=clock) as a:
        await a.catalog.register(instance("p1", ttl=10.0, deregister_after=10.0))
        a.catalog.heartbeat("pay", "p1")
        clock.advance(60)
        await eventually(lambda: a.ids() == [] and (ChangeKind.DEREGISTERED, "p1") in a.heard)
        await asyncio.sleep(0.2)
        assert a.ids() == []
        assert (await a.store.load())[0] == []


async def test_a_lease_lapses_late_by_the_slack_for_other_replicas_heartbeats(
    postgres: PostgresCluster, clock: FakeClock
) -> None:
    url = postgres.database()
    async with replica(url, clock=clock, follow=False) as a:
        await a.catalog.register(instance("p1", ttl=10.0))
        clock.advance(10.5)
        assert a.lapsed() == []  # a heartbeat to another replica may not be here yet
        clock.advance(LEASE_SLACK)
        assert a.lapsed() == ["p1"]
    async with replica(postgres.database(), clock=clock, lease_slack=0.0) as exact:
        await exact.catalog.register(instance("p2", ttl=10.0))
        clock.advance(10.5)
        assert exact.lapsed() == ["p2"]


async def test_the_registry_tasks_stop_when_cancelled_just_as_they_are_woken(
    postgres: PostgresCluster,
) -> None:
    """A cancel arriving with a wake-up (a registration or a notification right before
    shutdown) must stop the task, not be swallowed (asyncio.wait_for on 3.11 did)."""
    database = PgDatabase(postgres.database())
    await database.open()
    try:
        store = PgRegistryStore(database)
        catalog = Catalog(store)
        await catalog.load()
        reaper = asyncio.create_task(catalog.run_reaper())
        follower = asyncio.create_task(catalog.run_replication())
        waiter = asyncio.create_task(catalog.wait_for_change("pay", catalog.index, 30))
        await asyncio.sleep(0.1)  # all three waiting
        await catalog.register(instance("p1", ttl=30.0))  # wakes the reaper and the waiter
        catalog.remote_changed("elsewhere pay/p1")  # wakes the follower
        for task in (reaper, follower, waiter):
            task.cancel()
        done, _ = await asyncio.wait([reaper, follower, waiter], timeout=5)
        assert {task.get_name() for task in done} == {
            task.get_name() for task in (reaper, follower, waiter)
        }
        assert all(task.cancelled() for task in done)
    finally:
        await database.close()
