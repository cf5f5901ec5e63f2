"""The TaskStore contract, run against every implementation (workflows/abc.py): what the
task queues rely on, through the Protocol only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry import StoreUnavailable
from workflows.abc import NewTask, TaskRecord, TaskStore
from workflows.states import TaskState
from workflows.stores.postgres_tasks import PgTaskStore
from workflows.stores.sqlite_tasks import SqliteTaskStore

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[TaskStore]] = {
    "sqlite": sqlite_factory(SqliteTaskStore),
    "postgres": postgres_factory(PgTaskStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[TaskStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


@pytest.fixture
def store(backing: Backing[TaskStore]) -> TaskStore:
    return backing.store


def task(step: str = "reserve", attempt: int = 1, queue: str = "q", lease: float = 30.0) -> NewTask:
    return NewTask(
        process="p1",
        key=f"p1/{step}",
        attempt=attempt,
        queue=queue,
        lease=lease,
        payload=b'{"task":"reserveFunds"}',
        created_at=100.0,
    )


def record(value: TaskRecord | str | None) -> TaskRecord:
    assert isinstance(value, TaskRecord), value
    return value


async def test_a_task_opens_due_and_opening_it_again_finds_the_same_one(store: TaskStore) -> None:
    first, new = await store.open(task())
    assert new
    assert (first.state, first.delivery, first.payload) == (
        TaskState.DUE,
        None,
        b'{"task":"reserveFunds"}',
    )
    again, new = await store.open(task())
    assert (again, new) == (first, False)
    second, new = await store.open(task(attempt=2))
    assert new and second.seq != first.seq
    assert await store.depths() == {"q": 2}


async def test_a_task_may_open_claimed_for_a_waiting_worker(store: TaskStore) -> None:
    claimed, new = await store.open(task(lease=5.0), claim_for="w1", now=50.0)
    assert new
    assert (claimed.state, claimed.worker, claimed.lease_until) == (TaskState.CLAIMED, "w1", 55.0)
    assert claimed.delivery is not None
    assert await store.claim("q", "w2", 10, now=50.0) == []
    again, new = await store.open(task(), claim_for="w2", now=60.0)  # found again: as it was
    assert (again, new) == (claimed, False)
    released = record(await store.release(claimed.delivery))  # its poll went away
    assert (released.state, released.delivery) == (TaskState.DUE, None)
    assert await store.complete(claimed.delivery, {}, now=61.0) == "unknown"
    [reclaimed] = await store.claim("q", "w2", 10, now=62.0)
    assert reclaimed.seq == claimed.seq and reclaimed.delivery != claimed.delivery


async def test_a_claim_takes_due_tasks_of_its_queue_oldest_first_each_once(
    store: TaskStore,
) -> None:
    opened = [(await store.open(task(f"s{i}")))[0] for i in range(3)]
    await store.open(task("other", queue="elsewhere"))
    claimed = await store.claim("q", "w1", 2, now=1000.0)
    assert [c.seq for c in claimed] == [opened[0].seq, opened[1].seq]
    assert all(c.state == TaskState.CLAIMED and c.worker == "w1" for c in claimed)
    assert [c.lease_until for c in claimed] == [1030.0, 1030.0]
    assert len({c.delivery for c in claimed}) == 2
    assert [c.seq for c in await store.claim("q", "w2", 10, now=1000.0)] == [opened[2].seq]
    assert await store.claim("q", "w2", 10, now=1000.0) == []
    assert await store.depths() == {"elsewhere": 1}


async def test_concurrent_claims_never_share_a_task(store: TaskStore) -> None:
    for i in range(20):
        await store.open(task(f"s{i}"))
    batches = await asyncio.gather(*(store.claim("q", f"w{n}", 3, 1.0) for n in range(10)))
    seqs = [c.seq for batch in batches for c in batch]
    assert len(seqs) == len(set(seqs)) == 20


async def test_two_stores_over_one_database_never_hand_out_a_task_twice(
    backend: str, tmp_path: Path, store: TaskStore
) -> None:
    """Two daemons (replicas) polling one queue at once: each task goes to one of them."""
    for i in range(60):
        await store.open(task(f"s{i}"))
    async with factory_for(FACTORIES, backend)(tmp_path) as other:
        stores = [store, other.store]
        batches = await asyncio.gather(
            *(stores[n % 2].claim("q", f"w{n}", 4, 1.0) for n in range(20))
        )
        by_replica = [
            [c for n, batch in enumerate(batches) if n % 2 == side for c in batch]
            for side in (0, 1)
        ]
        deliveries = [c.delivery for claims in by_replica for c in claims]
        assert len(deliveries) == len(set(deliveries)) == 60
        assert len({c.seq for claims in by_replica for c in claims}) == 60
        assert all(by_replica), "both replicas took a share"
        # Each answer lands once, on whichever replica's store it is given to.
        answers = [
            stores[n % 2].complete(c.delivery or "", {"n": n}, now=2.0)
            for n, c in enumerate(c for claims in by_replica for c in claims)
        ]
        assert all(isinstance(a, TaskRecord) for a in await asyncio.gather(*answers))
        assert await other.store.claim("q", "w", 100, 3.0) == []


async def test_a_reopened_store_finds_its_tasks_and_their_claims(
    backend: str, tmp_path: Path, store: TaskStore
) -> None:
    await store.open(task())
    [claim] = await store.claim("q", "w1", 1, now=10.0)
    assert claim.delivery is not None
    async with factory_for(FACTORIES, backend)(tmp_path) as reopened:  # a restart
        await reopened.store.create_tables()
        assert await reopened.store.open(task()) == (claim, False)
        done = record(await reopened.store.complete(claim.delivery, {"ok": 1}, now=11.0))
        assert (done.seq, done.state) == (claim.seq, TaskState.DONE)


async def test_complete_answers_only_the_open_claim(store: TaskStore) -> None:
    await store.open(task())
    [claim] = await store.claim("q", "w1", 1, now=10.0)
    assert claim.delivery is not None
    done = record(await store.complete(claim.delivery, {"reservation": "r-1"}, now=11.0))
    assert (done.state, done.output) == (TaskState.DONE, {"reservation": "r-1"})
    assert await store.complete(claim.delivery, {"again": True}, now=12.0) == "stale"
    assert await store.fail(claim.delivery, "late", True, now=12.0) == "stale"
    assert await store.heartbeat(claim.delivery, now=12.0) == "stale"
    assert await store.complete("no-such-delivery", None, now=12.0) == "unknown"
    assert (await store.open(task()))[0].output == {"reservation": "r-1"}


async def test_fail_keeps_the_message_and_whether_to_retry(store: TaskStore) -> None:
    await store.open(task())
    [claim] = await store.claim("q", None, 1, now=10.0)
    assert claim.delivery is not None
    failed = record(await store.fail(claim.delivery, "card declined", False, now=11.0))
    assert (failed.state, failed.error, failed.retryable) == (
        TaskState.FAILED,
        "card declined",
        False,
    )


async def test_a_heartbeat_renews_the_lease_and_holds_off_expiry(store: TaskStore) -> None:
    await store.open(task(lease=5.0))
    [claim] = await store.claim("q", "w1", 1, now=10.0)
    assert claim.delivery is not None
    assert record(await store.heartbeat(claim.delivery, now=14.0)).lease_until == 19.0
    assert await store.expire(claim.delivery, now=15.0) is None  # renewed meanwhile
    expired = record(await store.expire(claim.delivery, now=19.0))
    assert expired.state == TaskState.EXPIRED
    assert await store.complete(claim.delivery, {}, now=20.0) == "stale"
    assert await store.claim("q", "w2", 1, now=20.0) == []  # the runner opens the next attempt


async def test_cancel_closes_an_open_task_and_leaves_an_ended_one(store: TaskStore) -> None:
    await store.open(task())
    [claim] = await store.claim("q", "w1", 1, now=10.0)
    assert claim.delivery is not None
    assert record(await store.cancel("p1/reserve", 1, now=11.0)).state == TaskState.CANCELLED
    assert await store.complete(claim.delivery, {}, now=12.0) == "stale"
    await store.open(task(attempt=2))
    [second] = await store.claim("q", "w1", 1, now=10.0)
    assert second.delivery is not None
    await store.complete(second.delivery, {"ok": 1}, now=12.0)
    assert record(await store.cancel("p1/reserve", 2, now=13.0)).state == TaskState.DONE
    assert await store.cancel("p1/never", 1, now=13.0) is None


async def test_prune_forgets_ended_tasks_only(store: TaskStore) -> None:
    await store.open(task("open"))
    await store.open(task("ended"))
    claims = await store.claim("q", "w1", 2, now=10.0)
    ended = next(c for c in claims if c.key == "p1/ended")
    assert ended.delivery is not None
    await store.complete(ended.delivery, None, now=20.0)
    assert await store.prune(before=15.0) == 0
    assert await store.prune(before=21.0) == 1
    assert (await store.open(task("open")))[0].state == TaskState.CLAIMED


async def test_a_broken_storage_refuses_with_store_unavailable(
    backing: Backing[TaskStore],
) -> None:
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.open(task())


async def test_a_delivery_names_its_queue(store: TaskStore) -> None:
    await store.open(task(queue="payments"))
    [claim] = await store.claim("payments", "w1", 1, now=10.0)
    assert claim.delivery is not None
    assert await store.queue_of(claim.delivery) == "payments"
    assert await store.queue_of("no-such-delivery") is None
