"""The workflow store contract: what the engine relies on, run against every implementation.

Only the Protocols (workflows/abc.py) are used here, never tables, so a new store
(issue 17: PostgreSQL) proves itself by adding one entry to FACTORIES; the last section
alone, each backend's own, writes tables to set its scene.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from monitor.storage import Database, DatabaseError
from monitor.storage.postgres import PgDatabase
from registry import StoreUnavailable
from workflows.abc import NewTask, TaskRecord, TaskStore, WorkflowStore
from workflows.errors import Fenced
from workflows.records import (
    Attempt,
    Branch,
    NewEvent,
    Process,
    StoredDefinition,
    TaskEnd,
    TaskOpen,
    match_key,
    projection,
)
from workflows.states import AttemptKind, AttemptOutcome, ProcessStatus, TaskState
from workflows.stores.postgres import MIGRATIONS, PgWorkflowStore
from workflows.stores.postgres_tasks import PgTaskStore
from workflows.stores.sqlite import SqliteWorkflowStore
from workflows.stores.sqlite_tasks import ClaimLost, SqliteTaskStore
from workflows.waits import matches

from .conftest import until
from .pg import PostgresCluster


@dataclass
class Handle:
    """A store, and the faults a backend can be put into."""

    store: WorkflowStore
    tasks: TaskStore  # on the same database: a checkpoint writes task rows in its commit
    refuse_writes: Callable[[bool], Awaitable[None]]  # as a full or read-only disk does
    closed_error: tuple[type[Exception], ...]  # what a closed store raises


@contextlib.asynccontextmanager
async def sqlite_store(path: Path) -> AsyncIterator[Handle]:
    db = Database(path / "hms.db")
    await db.open()

    async def refuse_writes(refuse: bool) -> None:
        def run(d: Any) -> None:
            d.execute(f"PRAGMA query_only = {int(refuse)}")

        await db.read(run)

    try:
        # A closed Database says DatabaseError today; StoreUnavailable is the promise.
        yield Handle(
            SqliteWorkflowStore(db),
            SqliteTaskStore(db),
            refuse_writes,
            (StoreUnavailable, DatabaseError),
        )
    finally:
        await db.close()


def postgres_store(cluster: PostgresCluster) -> Factory:
    """Stores on a database of the run's PostgreSQL, one per directory (a store opened
    twice in one directory sees the same data)."""
    urls: dict[Path, str] = {}

    @contextlib.asynccontextmanager
    async def store(path: Path) -> AsyncIterator[Handle]:
        if path not in urls:
            urls[path] = cluster.database()
        url = urls[path]
        db = PgDatabase(url)
        await db.open()

        async def refuse_writes(refuse: bool) -> None:
            if refuse:  # the database goes away under the open store
                cluster.refuse_connections(url)
            else:
                name = url.rsplit("/", 1)[1]
                with psycopg.connect(cluster.url(), autocommit=True) as conn:
                    conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

        try:
            yield Handle(
                PgWorkflowStore(db),
                PgTaskStore(db),
                refuse_writes,
                (StoreUnavailable, DatabaseError),
            )
        finally:
            await db.close()

    return store


Factory = Callable[[Path], contextlib.AbstractAsyncContextManager[Handle]]
FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Factory]] = {
    "sqlite": lambda _: sqlite_store,
    "postgres": lambda request: postgres_store(request.getfixturevalue("postgres")),
}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request: pytest.FixtureRequest) -> Factory:
    return FACTORIES[request.param](request)


@pytest.fixture
async def handle(factory: Factory, tmp_path: Path) -> AsyncIterator[Handle]:
    async with factory(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


def new_process(n: int, workflow: str = "Pay", key: str | None = None, **kw: Any) -> Process:
    return Process(
        id=f"p{n:04d}",
        workflow=workflow,
        status=kw.pop("status", ProcessStatus.STARTED),
        input={"n": n},
        outputs={},
        idempotency_key=key,
        created_at=100.0 + n,
        updated_at=100.0 + n,
        **kw,
    )


def attempt(step: str, outcome: AttemptOutcome = AttemptOutcome.OK) -> Attempt:
    return Attempt(
        step=step,
        kind=AttemptKind.CALL,
        attempt=1,
        started_at=1.0,
        ended_at=2.0,
        outcome=outcome,
        error=None if outcome is AttemptOutcome.OK else "HTTP 503",
        instance="i1",
        http_status=200 if outcome is AttemptOutcome.OK else 503,
    )


def event(seq: int, topic: str = "paid", key: str | None = None, at: float = 0.0) -> NewEvent:
    data = orjson.dumps({"n": seq})
    return NewEvent(seq=seq, topic=topic, data=data, key=key or f"k{seq}", published_at=at)


async def create(store: WorkflowStore, *processes: Process) -> list[Process]:
    created, _ = await store.create(list(processes), None)
    return [p for p, _ in created]


async def test_create_tables_twice_keeps_what_is_stored(handle: Handle) -> None:
    await create(handle.store, new_process(1))
    await handle.store.create_tables()
    assert await handle.store.get("p0001") is not None


async def test_definition_versions_are_numbered_in_the_write(handle: Handle) -> None:
    store = handle.store

    def version(n: int, source: str, name: str = "Pay") -> StoredDefinition:
        spec = {"name": name, "steps": [{"name": "s", "publish": f"t{n}"}]}
        return StoredDefinition(name=name, version=0, source=source, spec=spec, defined_at=n)

    assert await store.add_definitions([version(1, "config")]) == [1]
    assert await store.add_definitions([version(2, "api"), version(3, "config", "Ship")]) == [2, 1]
    stored = await store.definitions()
    assert [(d.name, d.version, d.source) for d in stored] == [
        ("Pay", 1, "config"),
        ("Pay", 2, "api"),
        ("Ship", 1, "config"),
    ]
    assert stored[1].spec["steps"][0]["publish"] == "t2"
    # Two writers at once (two workers deploying): each gets its own number.
    got = await asyncio.gather(*(store.add_definitions([version(4, "api")]) for _ in range(4)))
    assert sorted(v for [v] in got) == [3, 4, 5, 6]


async def test_definition_versions_are_stored_all_or_none(handle: Handle) -> None:
    store = handle.store
    good = StoredDefinition(name="Pay", version=0, source="config", spec={}, defined_at=1.0)
    bad = StoredDefinition(name=None, version=0, source="config", spec={}, defined_at=1.0)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - a NOT NULL column refuses it
        await store.add_definitions([good, bad])
    assert await store.definitions() == []


async def test_signals_are_kept_until_a_checkpoint_takes_them(handle: Handle) -> None:
    store = handle.store
    [waiting, other] = await create(store, new_process(1), new_process(2))
    first = await store.add_signal("p0001", "docs", b'{"n": 1}', 10.0)
    second = await store.add_signal("p0001", "docs", b'{"n": 2}', 11.0)
    await store.add_signal("p0002", "docs", b"{}", 12.0)
    assert [(s.process, s.data) for s in await store.pending_signals()] == [
        ("p0001", {"n": 1}),
        ("p0001", {"n": 2}),
        ("p0002", {}),
    ]
    assert first.seq < second.seq
    waiting.taken_signals = (first.seq,)
    await store.checkpoint(waiting)
    assert waiting.taken_signals == ()
    other.status, other.finished_at = ProcessStatus.COMPLETED, 20.0  # no one takes them now
    await store.checkpoint(other)
    assert [s.data for s in await store.pending_signals()] == [{"n": 2}]


async def test_a_checkpoint_reads_back_with_its_history(handle: Handle) -> None:
    store = handle.store
    [process] = await create(store, new_process(1, key="k", deadline_at=500.0))
    process.status, process.position, process.outputs = ProcessStatus.WAITING, 1, {"a": {"x": 1}}
    process.wake_at, process.wait_seq, process.error = (
        300.0,
        7,
        {"step": "b", "message": "HTTP 503", "status": 503, "body": "down"},
    )
    process.pending = [attempt("a"), attempt("b", AttemptOutcome.ERROR)]
    await store.checkpoint(process)
    assert process.pending == []
    process.pending = [attempt("b")]
    process.status, process.finished_at = ProcessStatus.COMPLETED, 400.0
    await store.checkpoint(process)

    stored = await store.get("p0001")
    assert stored is not None
    got, history = stored
    assert (got.status, got.position, got.outputs) == (ProcessStatus.COMPLETED, 1, {"a": {"x": 1}})
    assert (got.wake_at, got.wait_seq, got.deadline_at) == (300.0, 7, 500.0)
    assert got.error == {"step": "b", "message": "HTTP 503", "status": 503, "body": "down"}
    assert (got.idempotency_key, got.input, got.finished_at) == ("k", {"n": 1}, 400.0)
    assert got.status is ProcessStatus.COMPLETED  # read back as the enum
    assert [(a.step, a.outcome) for a in history] == [
        ("a", AttemptOutcome.OK),
        ("b", AttemptOutcome.ERROR),
        ("b", AttemptOutcome.OK),
    ]
    assert history[1] == attempt("b", AttemptOutcome.ERROR)


async def test_a_process_with_branches_numbers_its_rows_after_those_stored(
    handle: Handle,
) -> None:
    """Branches checkpoint concurrently: one refused while another commits leaves the
    count in memory behind the table, so their rows are numbered from the table."""
    store = handle.store
    [process] = await create(store, new_process(1))
    process.branches = {"left": Branch(), "right": Branch()}
    process.pending = [attempt("left"), attempt("right")]
    await store.checkpoint(process)
    process.history_count = 0  # as a racing, refused checkpoint's rollback leaves it
    process.pending = [attempt("left", AttemptOutcome.ERROR)]
    await store.checkpoint(process)
    stored = await store.get("p0001")
    assert stored is not None
    assert [(a.step, a.outcome) for a in stored[1]] == [
        ("left", AttemptOutcome.OK),
        ("right", AttemptOutcome.OK),
        ("left", AttemptOutcome.ERROR),
    ]
    assert set(stored[0].branches) == {"left", "right"}


def new_task(key: str) -> NewTask:
    return NewTask(
        process=key.split("/")[0],
        key=key,
        attempt=1,
        queue="q",
        lease=30.0,
        payload=b"{}",
        created_at=1.0,
    )


async def test_a_checkpoint_answers_a_task_and_opens_the_next_in_its_commit(
    handle: Handle,
) -> None:
    store, tasks = handle.store, handle.tasks
    await tasks.create_tables()
    [process] = await create(store, new_process(1))
    await tasks.open(new_task("p0001/a"))
    [claimed] = await tasks.claim("q", "w1", 1, 10.0)
    assert claimed.delivery is not None
    answered: list[str] = []
    opened: list[tuple[TaskRecord, bool]] = []
    process.task_ends = (
        TaskEnd(
            delivery=claimed.delivery,
            state=TaskState.DONE,
            output={"ok": 1},
            ended_at=11.0,
            written=lambda: answered.append("a"),
        ),
    )
    process.task_open = TaskOpen(
        task=new_task("p0001/b"),
        claim_for="w2",
        clock=lambda: 12.0,
        opened=lambda record, new: opened.append((record, new)),
    )
    process.position, process.pending = 1, [attempt("a")]
    await store.checkpoint(process)
    assert answered == ["a"]
    [(record, new)] = opened
    assert (new, record.key, record.state, record.worker) == (
        True,
        "p0001/b",
        TaskState.CLAIMED,
        "w2",
    )
    assert record.lease_until == 42.0  # leased from the commit's clock
    assert await tasks.complete(claimed.delivery, {}, 13.0) == "stale"  # answered once
    assert record.delivery is not None
    # The process fails: its task still open is cancelled with its last checkpoint.
    process.has_tasks, process.status, process.finished_at = True, ProcessStatus.FAILED, 14.0
    await store.checkpoint(process)
    assert await tasks.heartbeat(record.delivery, 15.0) == "stale"


async def test_a_checkpoint_whose_task_claim_was_lost_writes_nothing(handle: Handle) -> None:
    store, tasks = handle.store, handle.tasks
    await tasks.create_tables()
    [process] = await create(store, new_process(1))
    await tasks.open(new_task("p0001/a"))
    [claimed] = await tasks.claim("q", "w1", 1, 10.0)
    assert claimed.delivery is not None
    assert await tasks.expire(claimed.delivery, 50.0) is not None  # the lease ran out
    process.task_ends = (TaskEnd(delivery=claimed.delivery, state=TaskState.DONE, ended_at=51.0),)
    process.status, process.pending = ProcessStatus.RUNNING, [attempt("a")]
    with pytest.raises(ClaimLost):
        await store.checkpoint(process)
    assert process.pending == [attempt("a")]  # back for the retry
    stored = await store.get("p0001")
    assert stored is not None
    assert (stored[0].status, stored[1]) == (ProcessStatus.STARTED, [])


async def test_a_checkpoint_of_a_process_claimed_elsewhere_is_fenced(handle: Handle) -> None:
    """A replica taken for dead keeps running its copy: its checkpoints write nothing once
    another replica has claimed the process, and the new owner's are written."""
    store = handle.store
    [stale] = await create(store, new_process(1, owner="r1/a"))
    signal = await store.add_signal("p0001", "go", b"{}", 5.0)
    [claimed] = await store.claim_orphans("r2/b", ["r1/a"], 10)
    assert (claimed.id, claimed.owner) == ("p0001", "r2/b")
    stale.status, stale.pending, stale.taken_signals = (
        ProcessStatus.RUNNING,
        [attempt("a")],
        (signal.seq,),
    )
    with pytest.raises(Fenced):
        await store.checkpoint(stale)
    stored = await store.get("p0001")
    assert stored is not None
    assert (stored[0].status, stored[0].owner, stored[1]) == (ProcessStatus.STARTED, "r2/b", [])
    assert [s.seq for s in await store.pending_signals()] == [signal.seq]  # not taken
    claimed.status, claimed.pending = ProcessStatus.RUNNING, [attempt("b")]
    await store.checkpoint(claimed)
    stored = await store.get("p0001")
    assert stored is not None
    assert (stored[0].status, [a.step for a in stored[1]]) == (ProcessStatus.RUNNING, ["b"])


async def test_take_over_takes_what_another_may_hold_and_reads_take_the_rest(
    handle: Handle,
) -> None:
    """A new leader takes at once the processes its predecessor may hold in memory (due
    within its horizon, or on no timer and written lately); the rest become its own as it
    reads them, as they are once any checkpoint of the old owner's has committed."""
    store = handle.store
    created = await create(
        store,
        new_process(1, owner="r1/a", due_at=150.0),  # due soon: maybe in the old one's memory
        new_process(2, owner="r1/a", due_at=5000.0),  # an hour away: a row
        new_process(3, owner="r1/a"),  # waits for an event, written at 103: lately
        new_process(4, owner="r1/a", due_at=6000.0),
    )
    old = {p.id: p for p in created}
    assert await store.take_over("r2/b", 200.0, 100.0) == 2
    owners = {p.id: p.owner for p in await store.page(None, None, 10, None)}
    assert owners == {"p0001": "r2/b", "p0002": "r1/a", "p0003": "r2/b", "p0004": "r1/a"}

    first, read = await store.due(None, 5500.0, 10, owner="r2/b")  # the horizon reaches p0002
    assert [(p.id, p.owner) for p in (first, read)] == [("p0001", "r2/b"), ("p0002", "r2/b")]
    [loaded] = await store.unfinished_of(["p0004"], owner="r2/b")  # a signal for p0004
    assert (loaded.id, loaded.owner) == ("p0004", "r2/b")
    for stale in (old["p0002"], old["p0004"]):  # the old owner's copies: fenced
        stale.status = ProcessStatus.RUNNING
        with pytest.raises(Fenced):
            await store.checkpoint(stale)
    assert await store.unfinished_of(["p0002"]) == [read]  # a plain read takes nothing


async def test_take_over_makes_every_unfinished_process_the_new_leaders(handle: Handle) -> None:
    """A new leader takes them all; the old one's checkpoints are fenced from then."""
    store = handle.store
    stale, _, done, _ = await create(
        store,
        new_process(1, owner="r1/a"),
        new_process(2, owner="r1/a"),
        new_process(3, owner="r1/a"),
        new_process(4, owner="r2/b"),  # already the new leader's
    )
    done.status, done.finished_at = ProcessStatus.COMPLETED, 9.0
    await store.checkpoint(done)

    assert await store.take_over("r2/b", 1e9, 0.0) == 2
    assert await store.take_over("r2/b", 1e9, 0.0) == 0
    owners = {p.id: p.owner for p in await store.page(None, None, 10, None)}
    assert owners == {"p0001": "r2/b", "p0002": "r2/b", "p0003": "r1/a", "p0004": "r2/b"}
    stale.status, stale.pending = ProcessStatus.RUNNING, [attempt("a")]
    with pytest.raises(Fenced):
        await store.checkpoint(stale)
    [mine] = await store.unfinished_of(["p0001"])
    assert (mine.status, mine.history_count) == (ProcessStatus.STARTED, 0)
    mine.status, mine.pending = ProcessStatus.RUNNING, [attempt("b")]
    await store.checkpoint(mine)
    stored = await store.get("p0001")
    assert stored is not None
    assert (stored[0].status, [a.step for a in stored[1]]) == (ProcessStatus.RUNNING, ["b"])


async def test_claim_orphans_takes_dead_owners_unfinished_processes_oldest_first(
    handle: Handle,
) -> None:
    store = handle.store
    dead, alive = "r1/a", "r3/c"
    processes = await create(
        store,
        *(new_process(n, owner=dead) for n in (1, 2, 3)),
        new_process(4, owner=alive),
        new_process(5, owner=dead),
        new_process(6),  # nobody's (one daemon): never an orphan
    )
    processes[1].pending = [attempt("a"), attempt("b")]
    await store.checkpoint(processes[1])
    processes[4].status, processes[4].finished_at = ProcessStatus.COMPLETED, 300.0
    await store.checkpoint(processes[4])

    first = await store.claim_orphans("r2/b", [dead, "r9/z"], 2)
    assert [(p.id, p.owner, p.history_count) for p in first] == [
        ("p0001", "r2/b", 0),
        ("p0002", "r2/b", 2),
    ]
    assert first[0].input == {"n": 1}  # the whole process, to resume
    assert [p.id for p in await store.claim_orphans("r2/b", [dead], 10)] == ["p0003"]
    assert await store.claim_orphans("r2/b", [dead], 10) == []
    for id_, owner in (("p0004", alive), ("p0005", dead), ("p0006", None)):
        stored = await store.get(id_)
        assert stored is not None
        assert stored[0].owner == owner


async def test_claimers_at_once_take_each_orphan_once(factory: Factory, tmp_path: Path) -> None:
    """Two replicas (two stores on one database) sweeping the same dead member's processes."""
    async with factory(tmp_path) as one:
        await one.store.create_tables()
        await create(one.store, *(new_process(n, owner="r1/a") for n in range(20)))
        async with factory(tmp_path) as two:
            claims = [
                store.claim_orphans(owner, ["r1/a"], 3)
                for owner, store in (("r2/b", one.store), ("r3/c", two.store)) * 4
            ]
            claimed = [p for batch in await asyncio.gather(*claims) for p in batch]
        ids = [p.id for p in claimed]
        assert len(ids) == len(set(ids)) >= 12  # none twice; most taken at once
        for process in claimed:
            stored = await one.store.get(process.id)
            assert stored is not None
            assert stored[0].owner == process.owner  # the claim it got is the one stored


async def test_an_unknown_process_is_none(handle: Handle) -> None:
    assert await handle.store.get("nope") is None


async def test_the_same_idempotency_key_gives_the_stored_process(handle: Handle) -> None:
    store = handle.store
    await create(store, new_process(1, key="k"))
    created, _ = await store.create(
        [new_process(2, key="k"), new_process(3, workflow="Other", key="k")], None
    )
    assert [(p.id, new) for p, new in created] == [("p0001", False), ("p0003", True)]
    found = await store.by_key("Other", "k")
    assert found is not None and found.id == "p0003"
    assert await store.by_key("Other", "unknown") is None
    assert await store.by_key("Nothing", "k") is None


async def test_an_event_and_its_processes_are_stored_once(handle: Handle) -> None:
    store = handle.store
    created, seq = await store.create([new_process(1, key="event:k1")], event(5, key="k1"))
    assert (seq, created[0][1]) == (5, True)
    again, seq = await store.create([new_process(2, key="event:k1")], event(6, key="k1"))
    assert (seq, again[0][1]) == (None, False)
    assert [e.seq for e in await store.events_since("paid", 0)] == [5]


async def test_unfinished_are_the_open_processes_oldest_first(handle: Handle) -> None:
    store = handle.store
    _, b, c = await create(store, new_process(1), new_process(2), new_process(3))
    b.status, b.finished_at = ProcessStatus.FAILED, 200.0
    c.pending = [attempt("x"), attempt("y")]
    await store.checkpoint(b)
    await store.checkpoint(c)
    open_ = await store.unfinished()
    assert [(p.id, p.history_count) for p in open_] == [("p0001", 0), ("p0003", 2)]


# -- residency: what the engine loads (workflows/engine.py keeps only those due in memory)


async def test_due_are_the_unfinished_processes_due_by_then_in_due_order(handle: Handle) -> None:
    store = handle.store
    processes = await create(
        store,
        new_process(1, due_at=10.0),
        new_process(2, due_at=5.0),
        new_process(3, due_at=10.0),
        new_process(4, due_at=20.0),  # after the window
        new_process(5),  # only an event, a signal or a cancel wakes it
        new_process(6, due_at=7.0),
    )
    processes[0].pending = [attempt("a"), attempt("b")]
    await store.checkpoint(processes[0])
    processes[5].status, processes[5].finished_at = ProcessStatus.COMPLETED, 8.0
    await store.checkpoint(processes[5])

    due = await store.due(None, 10.0, 10)  # the bound is in the window
    assert [(p.id, p.due_at, p.history_count) for p in due] == [
        ("p0002", 5.0, 0),
        ("p0001", 10.0, 2),
        ("p0003", 10.0, 0),
    ]
    assert due[1].input == {"n": 1}  # the whole process, to run
    assert [p.id for p in await store.due(None, 10.0, 2)] == ["p0002", "p0001"]
    assert [p.id for p in await store.due(None, 4.0, 10)] == []


async def test_due_pages_on_due_at_and_seq_through_ties(handle: Handle) -> None:
    store = handle.store
    await create(
        store,
        *(new_process(n, due_at=10.0) for n in range(1, 6)),
        new_process(6, due_at=5.0),
        new_process(7, due_at=12.0),
    )
    pages: list[list[str]] = []
    after: tuple[float, int] | None = None
    for _ in range(5):  # bounded: a cursor that does not move must fail, not hang
        page = await store.due(after, 12.0, 2)
        pages.append([p.id for p in page])
        if page:
            assert page[-1].due_at is not None
            after = (page[-1].due_at, page[-1].seq)
    assert pages == [
        ["p0006", "p0001"],
        ["p0002", "p0003"],
        ["p0004", "p0005"],
        ["p0007"],
        [],
    ]
    [third] = [p for p in await store.due(None, 12.0, 10) if p.id == "p0003"]
    after_third = await store.due((10.0, third.seq), 12.0, 10)
    assert [p.id for p in after_third] == ["p0004", "p0005", "p0007"]


async def test_a_checkpoint_keeps_when_a_process_is_due_and_what_it_waits_for(
    handle: Handle,
) -> None:
    store = handle.store
    [process] = await create(store, new_process(1, due_at=101.0))
    keys, match = match_key({"order": "o-1"})
    process.status, process.due_at = ProcessStatus.WAITING, 160.0
    process.wait_topic, process.wait_keys, process.wait_match = "paid", keys, match
    await store.checkpoint(process)
    stored = await store.get("p0001")
    assert stored is not None
    got = stored[0]
    assert (got.due_at, got.wait_topic, got.wait_keys, got.wait_match) == (
        160.0,
        "paid",
        '["order"]',
        '{"order":"o-1"}',
    )
    process.status, process.due_at = ProcessStatus.RUNNING, None  # the event came
    process.wait_topic = process.wait_keys = process.wait_match = None
    await store.checkpoint(process)
    [open_] = await store.unfinished()
    assert (open_.due_at, open_.wait_topic, open_.wait_keys, open_.wait_match) == (
        None,
        None,
        None,
        None,
    )
    assert await store.waiting_keys() == []


def waiting(n: int, topic: str, match: dict[str, Any], **kw: Any) -> Process:
    keys, stored = match_key(match)
    return new_process(n, wait_topic=topic, wait_keys=keys, wait_match=stored, **kw)


async def test_waiters_are_the_unfinished_processes_whose_stored_match_is_the_events(
    handle: Handle,
) -> None:
    store = handle.store
    processes = await create(
        store,
        waiting(1, "paid", {"order": 1}),
        waiting(2, "paid", {"order": 2}),
        waiting(3, "shipped", {"order": 1}),
        waiting(4, "paid", {"order": 1}),
        waiting(5, "paid", {"order": 1, "region": "eu"}),
        waiting(6, "paid", {"order": 1}),
        new_process(7),
    )
    processes[3].status, processes[3].finished_at = ProcessStatus.CANCELLED, 9.0
    await store.checkpoint(processes[3])
    data = {"order": 1, "region": "us"}
    one = projection('["order"]', data)
    assert sorted(await store.waiters("paid", one, 10)) == ["p0001", "p0006"]
    assert len(await store.waiters("paid", one, 1)) == 1
    assert await store.waiters("paid", projection('["order","region"]', data), 10) == []
    eu = projection('["order","region"]', {**data, "region": "eu"})
    assert await store.waiters("paid", eu, 10) == ["p0005"]
    assert await store.waiters("refunded", one, 10) == []


async def test_an_event_makes_the_waiters_it_matches_due_in_its_own_write(handle: Handle) -> None:
    """A publish stores its event and makes the rows waiting for it due in one transaction,
    so a crash before they take it leaves them due (the next open reads them), never
    waiting as rows for an event already stored."""
    store = handle.store
    await create(
        store,
        waiting(1, "paid", {"order": 1}),  # only the event ends its wait
        waiting(2, "paid", {"order": 1}, due_at=3600.0),  # or its timeout, an hour away
        waiting(3, "paid", {"order": 2}),
        waiting(4, "paid", {"order": 1}, due_at=5.0),  # due sooner: kept
    )
    match = projection('["order"]', {"order": 1})
    event = NewEvent(seq=1, topic="paid", data=b'{"order": 1}', key="k", published_at=10.0)
    await store.create([], replace(event, wakes=(match,)))
    due = await store.due(None, 10.0, 10)
    assert [(p.id, p.due_at) for p in due] == [("p0004", 5.0), ("p0001", 10.0), ("p0002", 10.0)]
    again = replace(event, seq=2, published_at=20.0, wakes=(match,))  # the same key: not stored
    await store.create([], again)
    assert [p.due_at for p in await store.due(None, 30.0, 10)] == [5.0, 10.0, 10.0]


async def test_a_signal_makes_its_process_due_in_its_own_write(handle: Handle) -> None:
    store = handle.store
    await create(store, new_process(1), new_process(2, due_at=3600.0))
    for process_id in ("p0001", "p0002"):
        await store.add_signal(process_id, "go", b"{}", 10.0)
    assert [(p.id, p.due_at) for p in await store.due(None, 10.0, 10)] == [
        ("p0001", 10.0),
        ("p0002", 10.0),
    ]


async def test_unfinished_of_version_are_one_versions_unfinished_processes(
    handle: Handle,
) -> None:
    store = handle.store
    processes = await create(
        store,
        new_process(1),
        new_process(2, workflow_version=2),
        new_process(3),
    )
    processes[2].status, processes[2].finished_at = ProcessStatus.FAILED, 9.0
    await store.checkpoint(processes[2])
    workflow = processes[0].workflow
    assert await store.unfinished_of_version(workflow, 1) == ["p0001"]
    assert await store.unfinished_of_version(workflow, 2) == ["p0002"]
    assert await store.unfinished_of_version("other", 1) == []


# (stored match, event data, whether waits.matches holds): a publish finds a waiter by its
# stored match exactly when the engine in memory would hand it the event.
MATCH_CASES: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    ({"order": 1}, {"order": 1, "other": 2}, True),
    ({"order": 1}, {"order": 2}, False),
    ({"order": 1}, {}, False),
    ({"order": None}, {}, True),  # a missing key reads as null
    ({"order": None}, {"order": None}, True),
    ({"order": None}, {"order": 0}, False),
    ({"b": "x", "a": 1}, {"a": 1, "b": "x"}, True),
    ({"o": {"id": 1, "tags": ["a", "b"]}}, {"o": {"tags": ["a", "b"], "id": 1}}, True),
    ({"o": {"id": 1}}, {"o": {"id": 1, "more": 2}}, False),  # nested values whole, not a part
    ({"tags": ["a", "b"]}, {"tags": ["b", "a"]}, False),
    ({"s": "1"}, {"s": 1}, False),
    ({"name": "Zoë"}, {"name": "Zoë"}, True),
    ({}, {"anything": 1}, True),
    ({"n": 5}, {"n": 5.0}, True),  # equal as the resident waiter's == sees them
    ({"n": 1}, {"n": True}, True),
    ({"n": 0.0}, {"n": -0.0}, True),
    ({"n": 0.5}, {"n": 0.5}, True),
    ({"o": {"n": 2}}, {"o": {"n": 2.0}}, True),
    ({"n": 2**70}, {"n": 2**70}, True),  # past 64 bits
    ({"n": 2**70}, {"n": 2**70 + 1}, False),
]


async def test_a_waiter_is_found_exactly_when_the_event_matches(handle: Handle) -> None:
    store = handle.store
    await create(store, *(waiting(n, f"t{n}", m) for n, (m, _, _) in enumerate(MATCH_CASES)))
    for n, (match, data, expected) in enumerate(MATCH_CASES):
        keys, stored = match_key(match)
        assert matches(match, data) is expected, (match, data)
        assert (projection(keys, data) == stored) is expected, (match, data)
        found = await store.waiters(f"t{n}", projection(keys, data), 10)
        assert found == ([f"p{n:04d}"] if expected else []), (match, data)


async def test_waiting_keys_are_distinct_over_unfinished_processes(handle: Handle) -> None:
    store = handle.store
    processes = await create(
        store,
        waiting(1, "paid", {"order": 1}),
        waiting(2, "paid", {"order": 2}),
        waiting(3, "paid", {"order": 1, "region": "eu"}),
        waiting(4, "shipped", {"order": 1}),
        waiting(5, "refunded", {"order": 1}),
        new_process(6),
    )
    processes[4].status, processes[4].finished_at = ProcessStatus.COMPLETED, 9.0
    await store.checkpoint(processes[4])
    assert sorted(await store.waiting_keys()) == [
        ("paid", '["order","region"]'),
        ("paid", '["order"]'),
        ("shipped", '["order"]'),
    ]


async def test_unfinished_of_reads_those_of_the_ids_not_finished(handle: Handle) -> None:
    store = handle.store
    one, two, _ = await create(store, new_process(1), new_process(2), new_process(3))
    one.pending = [attempt("a")]
    await store.checkpoint(one)
    two.status, two.finished_at = ProcessStatus.FAILED, 9.0
    await store.checkpoint(two)
    got = await store.unfinished_of(["p0002", "p0001", "nope"])
    assert [(p.id, p.history_count, p.input) for p in got] == [("p0001", 1, {"n": 1})]
    assert await store.unfinished_of([]) == []


async def test_page_is_newest_first_with_a_cursor_and_filters(handle: Handle) -> None:
    store = handle.store
    processes = await create(store, *(new_process(n, "Pay" if n % 2 else "Ship") for n in range(6)))
    processes[4].status = ProcessStatus.RUNNING
    await store.checkpoint(processes[4])
    first = await store.page(None, None, 2, None)
    assert [p.id for p in first] == ["p0005", "p0004"]
    rest = await store.page(None, None, 10, first[-1].seq)
    assert [p.id for p in rest] == ["p0003", "p0002", "p0001", "p0000"]
    assert [p.id for p in await store.page("Pay", None, 10, None)] == ["p0005", "p0003", "p0001"]
    running = await store.page(None, ProcessStatus.RUNNING, 10, None)
    assert [p.id for p in running] == ["p0004"]


async def test_counts_are_by_workflow_and_status(handle: Handle) -> None:
    store = handle.store
    a, _, _ = await create(store, new_process(1), new_process(2), new_process(3, "Ship"))
    a.status = ProcessStatus.RUNNING
    await store.checkpoint(a)
    assert await store.counts() == {
        ("Pay", ProcessStatus.RUNNING): 1,
        ("Pay", ProcessStatus.STARTED): 1,
        ("Ship", ProcessStatus.STARTED): 1,
    }


async def test_prune_forgets_only_what_ended_before_the_boundaries(handle: Handle) -> None:
    store = handle.store
    early, late, _ = await create(store, new_process(1), new_process(2), new_process(3))
    for process, at in ((early, 199.0), (late, 200.0)):
        process.status, process.finished_at = ProcessStatus.COMPLETED, at
        process.pending = [attempt("a")]
        await store.checkpoint(process)
    await store.create([], event(1, at=99.0))
    await store.create([], event(2, at=100.0))

    gone = await store.prune(200.0, 100.0)
    assert gone == {("Pay", ProcessStatus.COMPLETED): 1}
    assert await store.get("p0001") is None
    assert await store.get("p0002") is not None
    assert await store.get("p0003") is not None  # unfinished: never pruned
    assert [e.seq for e in await store.events_since("paid", 0)] == [2]
    assert await store.last_event_seq() == 2


async def test_who_started_and_who_cancelled_are_kept(handle: Handle) -> None:
    store = handle.store
    [process, _] = await create(
        store, new_process(1, started_by="alice"), new_process(2, started_by="schedule")
    )
    process.cancel_requested, process.cancelled_by = True, "bob"
    await store.checkpoint(process)
    stored = await store.get("p0001")
    assert stored is not None
    assert (stored[0].started_by, stored[0].cancelled_by) == ("alice", "bob")
    assert [(p.started_by, p.cancelled_by) for p in await store.page(None, None, 10, None)] == [
        ("schedule", None),
        ("alice", "bob"),
    ]
    assert [p.started_by for p in await store.unfinished()] == ["alice", "schedule"]


async def test_a_signals_sender_is_kept_and_named_by_the_history_row_that_takes_it(
    handle: Handle,
) -> None:
    store = handle.store
    [process] = await create(store, new_process(1))
    signal = await store.add_signal("p0001", "approve", b"{}", 10.0, "carol")
    assert signal.by == "carol"
    assert [s.by for s in await store.pending_signals()] == ["carol"]
    taken = replace(attempt("approve"), kind=AttemptKind.WAIT_FOR, signalled_by=signal.by)
    process.pending, process.taken_signals = [attempt("first"), taken], (signal.seq,)
    await store.checkpoint(process)
    stored = await store.get("p0001")
    assert stored is not None
    assert [(a.step, a.signalled_by) for a in stored[1]] == [("first", None), ("approve", "carol")]


async def test_an_events_publisher_is_kept(handle: Handle) -> None:
    store = handle.store
    await store.create([], replace(event(1, "paid"), actor="dave"))
    await store.create([], event(2, "paid"))  # the daemon's own: nobody
    assert [e.actor for e in await store.events_since("paid", 0)] == ["dave", None]
    assert [by for *_, by in await store.events_after(0, 2, 10)] == ["dave", None]


async def test_events_since_are_one_topic_in_order(handle: Handle) -> None:
    store = handle.store
    for seq, topic in ((1, "paid"), (2, "shipped"), (3, "paid"), (4, "paid")):
        await store.create([], event(seq, topic, at=float(seq)))
    since = await store.events_since("paid", 1)
    assert [(e.seq, e.topic, e.data, e.published_at) for e in since] == [
        (3, "paid", {"n": 3}, 3.0),
        (4, "paid", {"n": 4}, 4.0),
    ]


async def test_events_after_are_bounded_and_ordered(handle: Handle) -> None:
    store = handle.store
    for seq in (1, 2, 3, 4, 5):
        await store.create([], event(seq, "paid" if seq % 2 else "shipped", at=float(seq)))
    after = await store.events_after(1, 4, 10)
    assert [(s, t, orjson.loads(d)) for s, t, d, *_ in after] == [
        (2, "shipped", {"n": 2}),
        (3, "paid", {"n": 3}),
        (4, "shipped", {"n": 4}),
    ]
    assert [s for s, *_ in await store.events_after(0, 5, 2)] == [1, 2]


async def test_last_event_seq_starts_at_zero(handle: Handle) -> None:
    assert await handle.store.last_event_seq() == 0


async def test_last_event_seq_outlives_the_events_pruned(handle: Handle) -> None:
    """A client's Last-Event-ID keeps its meaning: ids are never given twice."""
    store = handle.store
    for seq in (3, 7):
        await store.create([], event(seq, at=1.0))
    await store.create([], event(5, at=1.0))  # a lower id stored later moves nothing
    await store.prune(0.0, 10.0)
    assert await store.events_after(0, 100, 10) == []
    assert await store.last_event_seq() == 7


async def test_outcomes_count_a_process_once_per_minute(handle: Handle) -> None:
    store = handle.store
    ok, failed, late = await create(
        store, new_process(1), new_process(2), new_process(3, deadline_at=150.0)
    )
    ok.status, ok.finished_at = ProcessStatus.COMPLETED, 130.0
    failed.status, failed.finished_at = ProcessStatus.FAILED, 170.0
    late.deadline_missed = True  # bad at its deadline, finished or not
    for process in (ok, failed, late):
        await store.checkpoint(process)
    assert await store.outcomes("Pay", 0.0) == [(2, 1, 3)]
    assert await store.outcomes("Pay", 200.0) == []


async def test_refused_writes_raise_store_unavailable(handle: Handle) -> None:
    [process] = await create(handle.store, new_process(1))
    await handle.refuse_writes(True)
    process.status = ProcessStatus.RUNNING
    with pytest.raises(StoreUnavailable):
        await handle.store.checkpoint(process)
    with pytest.raises(StoreUnavailable):
        await handle.store.create([new_process(2)], None)
    await handle.refuse_writes(False)
    stored = await handle.store.get("p0001")
    assert stored is not None
    assert stored[0].status is ProcessStatus.STARTED  # the refused checkpoint left nothing


async def test_a_refused_checkpoint_is_written_whole_by_its_retry(handle: Handle) -> None:
    """A checkpoint refused (Overloaded, a full disk) and retried: the retry writes the
    history and deletes the taken signal, so no row is lost and no signal is taken twice."""
    store = handle.store
    [process] = await create(store, new_process(1))
    signal = await store.add_signal("p0001", "approve", b'{"by": "alice"}', 10.0)
    process.status, process.position = ProcessStatus.WAITING, 1
    process.pending, process.taken_signals = [attempt("first")], (signal.seq,)
    await handle.refuse_writes(True)
    with pytest.raises(StoreUnavailable):
        await store.checkpoint(process)
    await handle.refuse_writes(False)
    assert [s.seq for s in await store.pending_signals()] == [signal.seq]  # not taken yet
    await store.checkpoint(process)  # the retry
    assert (process.pending, process.taken_signals, process.history_count) == ([], (), 1)
    assert await store.pending_signals() == []  # taken once
    process.pending = [attempt("second")]
    await store.checkpoint(process)
    stored = await store.get("p0001")
    assert stored is not None
    assert [a.step for a in stored[1]] == ["first", "second"]


async def test_a_closed_store_refuses(factory: Factory, tmp_path: Path) -> None:
    async with factory(tmp_path) as handle:
        await handle.store.create_tables()
    with pytest.raises(handle.closed_error):
        await handle.store.get("p0001")
    with pytest.raises(handle.closed_error):
        await handle.store.create([new_process(1)], None)


async def test_a_reopened_store_reads_back_what_was_written(
    factory: Factory, tmp_path: Path
) -> None:
    async with factory(tmp_path) as handle:
        await handle.store.create_tables()
        [process] = await create(handle.store, new_process(1, key="k"))
        process.status, process.position = ProcessStatus.WAITING, 2
        process.pending = [attempt("a")]
        await handle.store.checkpoint(process)
        await handle.store.create([], event(9))
    async with factory(tmp_path) as handle:
        await handle.store.create_tables()
        [open_] = await handle.store.unfinished()
        assert (open_.id, open_.status, open_.position, open_.history_count) == (
            "p0001",
            ProcessStatus.WAITING,
            2,
            1,
        )
        assert await handle.store.last_event_seq() == 9
        assert await handle.store.counts() == {("Pay", ProcessStatus.WAITING): 1}


# -- each backend's own: stores written before residency, PostgreSQL's row locks --------
# These reach under the Protocols (old tables, a transaction held open) to set the scene.

# The processes table as the release before residency wrote it (no due_at, no wait).
OLD_PROCESSES = """
CREATE TABLE processes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    outputs TEXT NOT NULL,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    deadline_at REAL,
    deadline_missed INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    wake_at REAL,
    wait_seq INTEGER,
    compensating_from INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    output TEXT,
    workflow_version INTEGER NOT NULL DEFAULT 1,
    branches TEXT,
    owner TEXT,
    UNIQUE (workflow, idempotency_key)
)
"""
OLD_ROWS = (
    "INSERT INTO processes (id, workflow, status, input, outputs, created_at, updated_at, "
    "finished_at) VALUES ('p-waiting', 'Pay', 'waiting', '{}', '{}', 1.0, 2.0, NULL), "
    "('p-done', 'Pay', 'completed', '{}', '{}', 1.0, 3.0, 3.0)"
)


async def assert_due_at_their_last_checkpoint(store: WorkflowStore) -> None:
    """What was unfinished is due at its last checkpoint (the next open loads it); the rest
    never is; and checkpoints write the new columns."""
    [old] = await store.due(None, float("inf"), 10)
    assert (old.id, old.due_at, old.wait_topic, old.wait_keys, old.wait_match) == (
        "p-waiting",
        2.0,
        None,
        None,
        None,
    )
    done = await store.get("p-done")
    assert done is not None and done[0].due_at is None
    old.due_at, old.wait_topic, old.wait_keys, old.wait_match = 50.0, "paid", "[]", "{}"
    await store.checkpoint(old)
    assert await store.waiters("paid", "{}", 10) == ["p-waiting"]
    assert [p.due_at for p in await store.due(None, 60.0, 10)] == [50.0]


@contextlib.asynccontextmanager
async def opened_over_old_file(path: Path, *tables: str) -> AsyncIterator[SqliteWorkflowStore]:
    """The store opened on an SQLite file an older release left (`tables`: its statements)."""

    def leave_tables(d: Any) -> None:
        for statement in tables:
            d.execute(statement)

    db = Database(path)
    await db.open()
    try:
        await db.write(leave_tables)
        store = SqliteWorkflowStore(db)
        await store.create_tables()
        yield store
    finally:
        await db.close()


async def test_an_sqlite_file_from_before_residency_gets_its_columns_at_open(
    tmp_path: Path,
) -> None:
    async with opened_over_old_file(tmp_path / "hms.db", OLD_PROCESSES, OLD_ROWS) as store:
        await assert_due_at_their_last_checkpoint(store)


# The tables that name no actor, as the release before issue 18 wrote them.
OLD_ACTORLESS = (
    "CREATE TABLE process_history (process INTEGER NOT NULL, n INTEGER NOT NULL, "
    "step TEXT NOT NULL, kind TEXT NOT NULL, attempt INTEGER NOT NULL, "
    "started_at REAL NOT NULL, ended_at REAL NOT NULL, outcome TEXT NOT NULL, error TEXT, "
    "instance TEXT, http_status INTEGER, PRIMARY KEY (process, n)) WITHOUT ROWID",
    "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
    "data TEXT NOT NULL, key TEXT UNIQUE, published_at REAL NOT NULL)",
    "CREATE TABLE process_signals (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "process TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL, sent_at REAL NOT NULL)",
    "INSERT INTO events (seq, topic, data, key, published_at) VALUES (1, 'paid', '{}', 'k1', 1)",
)


async def test_an_sqlite_file_from_before_actors_gets_its_columns_at_open(
    tmp_path: Path,
) -> None:
    tables = (OLD_PROCESSES, OLD_ROWS, *OLD_ACTORLESS)
    async with opened_over_old_file(tmp_path / "hms.db", *tables) as store:
        [old] = await store.unfinished()
        assert (old.started_by, old.cancelled_by) == (None, None)
        signal = await store.add_signal("p-waiting", "go", b"{}", 5.0, "carol")
        old.cancelled_by, old.taken_signals = "bob", (signal.seq,)
        old.pending = [replace(attempt("go"), signalled_by="carol")]
        await store.checkpoint(old)
        await store.create([], replace(event(2), actor="dave"))
        stored = await store.get("p-waiting")
        assert stored is not None
        assert (stored[0].cancelled_by, [a.signalled_by for a in stored[1]]) == ("bob", ["carol"])
        assert [e.actor for e in await store.events_since("paid", 0)] == [None, "dave"]


async def test_a_postgres_database_from_before_residency_gets_its_columns_at_open(
    postgres: PostgresCluster,
) -> None:
    before_residency = 16  # how many migration steps that release had

    def leave_processes(conn: Any) -> None:
        conn.execute(OLD_ROWS)

    db = PgDatabase(postgres.database())
    await db.open()
    try:
        await db.migrate("workflows", MIGRATIONS[:before_residency])
        await db.write(leave_processes)
        store = PgWorkflowStore(db)
        await store.create_tables()
        await assert_due_at_their_last_checkpoint(store)
    finally:
        await db.close()


async def test_a_postgres_take_over_waits_for_checkpoints_in_flight(
    postgres: PostgresCluster,
) -> None:
    """The old leader's checkpoints holding rows commit first, then the rows are taken as
    they left them: a process they finished is not (PostgreSQL only: SQLite has one
    writer)."""
    url = postgres.database()
    old_db, new_db = PgDatabase(url), PgDatabase(url)
    await old_db.open()
    await new_db.open()
    try:
        old = PgWorkflowStore(old_db)
        await old.create_tables()
        await create(old, *(new_process(n, owner="r1/a") for n in (1, 2, 3)))
        holding, release = threading.Event(), threading.Event()

        def checkpoints_in_flight(conn: Any) -> None:  # one batch of the old group commit
            conn.execute("UPDATE processes SET status = 'running' WHERE id = 'p0001'")
            conn.execute(
                "UPDATE processes SET status = 'completed', finished_at = 9.0 WHERE id = 'p0002'"
            )
            holding.set()
            release.wait(30)

        async def taking_over_waits() -> bool:
            def read(conn: Any) -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE processes SET owner%'"
                ).fetchone()
                return bool(row[0])

            return await old_db.read(read)

        writing = asyncio.create_task(old_db.write(checkpoints_in_flight))
        await asyncio.to_thread(holding.wait, 30)
        taking = asyncio.create_task(PgWorkflowStore(new_db).take_over("r2/b", 1e9, 0.0))
        await until(taking_over_waits)
        release.set()
        await writing
        assert await taking == 2
        assert [(p.id, p.status, p.owner) for p in await old.unfinished()] == [
            ("p0001", ProcessStatus.RUNNING, "r2/b"),
            ("p0003", ProcessStatus.STARTED, "r2/b"),
        ]
        stored = await old.get("p0002")
        assert stored is not None
        assert (stored[0].status, stored[0].owner) == (ProcessStatus.COMPLETED, "r1/a")
    finally:
        await new_db.close()
        await old_db.close()
