"""The PostgreSQL handle every PostgreSQL store writes through (monitor/storage/postgres.py),
on the test run's own server: group commit, one failing write alone, versioned migrations,
a server crash answered with StoreUnavailable then recovered from, LISTEN after reconnects."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest

from monitor.audit.abc import AuditRecord
from monitor.audit.stores.postgres import MIGRATIONS as AUDIT_MIGRATIONS
from monitor.audit.stores.postgres import _Rider as AuditRider
from monitor.storage import DatabaseError
from monitor.storage.postgres import Listener, PgDatabase, notify
from monitor.storage.riders import Carried, Ordered
from registry import StoreUnavailable
from registry.stores.pg import Blind

from .pg import PostgresCluster

MIGRATIONS = ("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",)


async def opened(url: str) -> PgDatabase:
    database = PgDatabase(url)
    await database.open()
    await database.migrate("things", MIGRATIONS)
    return database


def insert(id: int, name: str | None) -> Any:
    def write(conn: psycopg.Connection[Any]) -> int:
        conn.execute("INSERT INTO things (id, name) VALUES (%s, %s)", [id, name])
        return id

    return write


def names(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM things ORDER BY id")]


async def test_writes_queued_together_commit_together_and_a_bad_one_fails_alone(
    postgres: PostgresCluster,
) -> None:
    database = await opened(postgres.database())
    try:
        outcomes = await asyncio.gather(
            *(database.write(insert(i, None if i == 3 else f"n{i}")) for i in range(6)),
            return_exceptions=True,
        )
        assert [o if isinstance(o, int) else "failed" for o in outcomes] == [
            0,
            1,
            2,
            "failed",
            4,
            5,
        ]
        assert isinstance(outcomes[3], psycopg.errors.NotNullViolation)
        assert await database.read(names) == ["n0", "n1", "n2", "n4", "n5"]
    finally:
        await database.close()


async def test_a_pipelined_batch_commits_together_and_a_bad_write_fails_alone(
    postgres: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that read nothing back (Blind) go as one pipeline, their riders at its end
    reading their ids; a failure there is raised at the pipeline's end, and the batch is
    replayed a write at a time, as any batch is."""
    pipelines: list[int] = []
    pipeline = psycopg.Connection.pipeline

    def counted(conn: psycopg.Connection[Any]) -> Any:
        pipelines.append(1)
        return pipeline(conn)

    monkeypatch.setattr(psycopg.Connection, "pipeline", counted)
    database = await opened(postgres.database())
    await database.migrate("audit", AUDIT_MIGRATIONS)
    try:
        records = [
            AuditRecord(time=1.0, actor="a", action="x", target=str(i), outcome=201)
            for i in range(6)
        ]
        writes = [
            Carried(Blind(insert(i, None if i == 3 else f"n{i}")), AuditRider(records[i]))
            for i in range(6)
        ]
        outcomes = await asyncio.gather(
            *(database.write(write, ride=False) for write in writes), return_exceptions=True
        )
        assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + ["NotNullViolation"] + [
            "NoneType"
        ] * 2
        assert await database.read(names) == ["n0", "n1", "n2", "n4", "n5"]
        ids = [r.id for r in records]
        assert ids[3] is None and len({*ids} - {None}) == 5  # each kept record its own id
        stored = await database.read(
            lambda conn: conn.execute("SELECT id, target FROM audit_records ORDER BY id").fetchall()
        )
        assert [(id_, target) for id_, target in stored] == [
            (r.id, r.target) for r in records if r.id is not None
        ]
        assert pipelines == [1]  # the batch went as one; its replay is not pipelined
        await database.write(insert(7, "n7"))  # a write that may read: never pipelined
        assert pipelines == [1]
    finally:
        await database.close()


async def test_migrations_apply_once_and_a_newer_database_is_refused(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    first = await opened(url)
    await first.write(insert(1, "kept"))
    await first.close()
    again = await opened(url)  # the step is not applied twice (it would fail: table exists)
    assert await again.read(names) == ["kept"]
    await again.migrate("things", (*MIGRATIONS, "ALTER TABLE things ADD COLUMN extra TEXT"))
    await again.close()

    older = PgDatabase(url)
    await older.open()
    with pytest.raises(DatabaseError, match="things tables are at version 2, newer than"):
        await older.migrate("things", MIGRATIONS)
    await older.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
async def test_a_server_crash_refuses_writes_then_they_succeed_again(
    postgres: PostgresCluster, pipelined: bool
) -> None:
    def write(id: int, name: str) -> Any:
        return Blind(insert(id, name)) if pipelined else insert(id, name)

    database = await opened(postgres.database())
    try:
        await database.write(write(1, "before"))
        await asyncio.to_thread(postgres.restart, "immediate")
        # The first write after the crash finds its connection dead: refused, not lost.
        with pytest.raises(StoreUnavailable):
            await database.write(write(2, "lost in the crash"))
        assert not database.writable
        await database.write(write(3, "after"))  # reconnected
        assert database.writable
        assert await database.read(names) == ["before", "after"]
    finally:
        await database.close()


async def test_listen_hears_committed_notifies_and_rereads_after_a_reconnect(
    postgres: PostgresCluster,
) -> None:
    url = postgres.database()
    database = await opened(url)
    heard: list[str] = []
    connects = 0

    def on_connect() -> None:
        nonlocal connects
        connects += 1

    listener = Listener(url, ["things"], lambda _, payload: heard.append(payload), on_connect)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)

        def announce(conn: psycopg.Connection[Any]) -> None:
            insert(1, "one")(conn)
            notify(conn, "things", "1")

        await database.write(announce)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == ["1"]

        await asyncio.to_thread(postgres.restart, "immediate")
        for _ in range(500):
            if connects == 2:
                break
            await asyncio.sleep(0.02)
        assert connects == 2  # reconnected and told the caller to re-read
    finally:
        await listener.stop()
        await database.close()


async def test_a_listener_whose_re_read_fails_connects_again_and_reads_again(
    postgres: PostgresCluster,
) -> None:
    """The re-read after a reconnect can fail (the server still starting): the listener
    tries again rather than ending, and stops cleanly."""
    url = postgres.database()
    connects = 0

    async def on_connect() -> None:
        nonlocal connects
        connects += 1
        if connects == 1:
            raise StoreUnavailable("storage unavailable: the server is starting")

    listener = Listener(url, ["things"], lambda _, __: None, on_connect)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        assert connects == 2
    finally:
        await listener.stop()


async def test_two_replicas_batches_with_audit_records_never_deadlock(
    postgres: PostgresCluster,
) -> None:
    """The trail's advisory lock (riders.Ordered) is taken before any row, by every batch.
    Here replica B replays its batch (one write failed) and wants row 1, which replica A's
    batch holds while it wants the lock: taken at A's end instead, the two would deadlock
    and B's innocent write fail with DeadlockDetected (an independent review's case)."""
    url = postgres.database()
    with psycopg.connect(url, autocommit=True) as conn:
        for step in AUDIT_MIGRATIONS:
            conn.execute(step)
        conn.execute("CREATE TABLE counters (k INTEGER PRIMARY KEY, v INTEGER)")
        conn.execute("INSERT INTO counters VALUES (1, 0)")
    a, b = PgDatabase(url), PgDatabase(url)
    a_holds_row, b_replaying = threading.Event(), threading.Event()

    def record(actor: str) -> AuditRider:
        return AuditRider(AuditRecord(time=0.0, actor=actor, action="x", target="t", outcome=200))

    def a_write(conn: psycopg.Connection[Any]) -> str:
        conn.execute("UPDATE counters SET v = v + 1 WHERE k = 1")
        a_holds_row.set()
        b_replaying.wait(2)
        return "a"

    attempts: list[int] = []

    def b_fails(conn: psycopg.Connection[Any]) -> str:
        attempts.append(1)
        if len(attempts) == 2:  # its replay: every lock is taken by now
            b_replaying.set()
        raise ValueError("a constraint")

    def b_row(conn: psycopg.Connection[Any]) -> str:
        a_holds_row.wait(2)
        conn.execute("UPDATE counters SET v = v + 10 WHERE k = 1")
        return "b"

    try:
        a_batch = asyncio.to_thread(a._run_batch, [Carried(a_write, record("a"))])
        b_batch = asyncio.to_thread(
            b._run_batch, [Carried(b_fails, record("b1")), Carried(b_row, record("b2"))]
        )
        a_out, b_out = await asyncio.gather(a_batch, b_batch)
        assert a_out == [(True, "a")]
        assert [ok for ok, _ in b_out] == [False, True], b_out
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT v FROM counters").fetchone() == (11,)
    finally:
        for database in (a, b):
            if database._conn is not None:
                database._conn.close()


async def test_a_lock_wait_that_fails_refuses_its_batch_and_the_next_writes(
    postgres: PostgresCluster,
) -> None:
    """A batch's lock is taken in its BEGIN's query; a wait for it that fails (a managed
    server's lock_timeout, a cancel) must roll the transaction back: the batch is refused
    (503) and the next write commits, not a writer stuck in an aborted transaction (an
    independent review's case)."""
    url = postgres.database()
    database = PgDatabase(url + "?options=-c%20lock_timeout%3D200")
    await database.open()
    await database.migrate("things", MIGRATIONS)
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(hashtext('audit'))")  # another replica's batch
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(database.write(Ordered(insert(1, "a"), "audit")), 5)
        holder.execute("SELECT pg_advisory_unlock(hashtext('audit'))")
        assert await asyncio.wait_for(database.write(insert(2, "b")), 5) == 2
        assert await asyncio.wait_for(database.write(Ordered(insert(3, "c"), "audit")), 5) == 3
        assert await database.read(names) == ["b", "c"]
    finally:
        holder.close()
        await asyncio.wait_for(database.close(), 5)
