"""Task steps waiting for workers, in the cluster's PostgreSQL (the `tasks` table, as on
SQLite: workflows/stores/sqlite_tasks.py).

Several replicas poll the same queues: a claim takes its rows `FOR UPDATE SKIP LOCKED`
(as Oban and Procrastinate claim jobs), so a row another replica's claim holds is
skipped, not waited for, and never handed out twice. Every other write names one row
(by delivery id, or by key and attempt) and is a single statement.
"""

from __future__ import annotations

from typing import Any

import orjson

from registry.stores.pg import Connection, PgTransactor
from workflows.abc import NewTask, Refusal, TaskRecord
from workflows.records import TaskEnd
from workflows.states import TaskState

from .sqlite_tasks import ClaimLost

__all__ = ["MIGRATIONS", "PgTaskStore", "cancel_open_in", "open_in", "write_end"]

MIGRATIONS = (
    # key COLLATE "C": byte order, as on SQLite, whatever the database's locale: only in
    # byte order is the range between '<id>/' and '<id>0' exactly the keys of process <id>.
    """CREATE TABLE tasks (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        process TEXT NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        attempt INTEGER NOT NULL,
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        lease DOUBLE PRECISION NOT NULL,
        payload BYTEA NOT NULL,
        delivery TEXT UNIQUE,
        worker TEXT,
        lease_until DOUBLE PRECISION,
        output TEXT,
        error TEXT,
        retryable BOOLEAN NOT NULL DEFAULT TRUE,
        created_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        UNIQUE (key, attempt)
    )""",
    "CREATE INDEX tasks_due ON tasks (queue, seq) WHERE state = 'due'",
    "CREATE INDEX tasks_ended ON tasks (ended_at)",
)

_COLUMNS = (
    "seq, process, key, attempt, queue, state, lease, payload, delivery, worker, lease_until, "
    "output, error, retryable"
)
# A delivery id made by the server (gen_random_uuid: a strong random source), so one
# statement gives each claimed row its own.
_NEW_DELIVERY = "replace(gen_random_uuid()::text, '-', '')"
# Built from the constants above only (no input reaches these strings).
_OPEN = (
    "INSERT INTO tasks (process, key, attempt, queue, state, lease, payload, created_at, "  # noqa: S608
    f"delivery, worker, lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
    f"CASE WHEN %s THEN {_NEW_DELIVERY} END, %s, %s) "
    f"ON CONFLICT (key, attempt) DO NOTHING RETURNING {_COLUMNS}"
)
_RELEASE = (
    "UPDATE tasks SET state = 'due', delivery = NULL, worker = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE delivery = %s AND state = 'claimed' RETURNING {_COLUMNS}"
)
# MATERIALIZED: the locked pick is made once, never re-planned into the UPDATE's join.
_CLAIM = (
    "WITH picked AS MATERIALIZED (SELECT seq AS picked FROM tasks WHERE queue = %s AND "  # noqa: S608
    "state = 'due' ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) "
    f"UPDATE tasks SET state = 'claimed', delivery = {_NEW_DELIVERY}, worker = %s, "
    f"lease_until = %s + lease FROM picked WHERE seq = picked RETURNING {_COLUMNS}"
)
_ANSWER = (
    "UPDATE tasks SET state = %s, output = %s, error = %s, retryable = %s, ended_at = %s "  # noqa: S608
    f"WHERE delivery = %s AND state = 'claimed' RETURNING {_COLUMNS}"
)
_HEARTBEAT = (
    "UPDATE tasks SET lease_until = %s + lease WHERE delivery = %s AND state = 'claimed' "  # noqa: S608
    f"RETURNING {_COLUMNS}"
)
_EXPIRE = (
    "UPDATE tasks SET state = 'expired', ended_at = %s WHERE delivery = %s AND "  # noqa: S608
    f"state = 'claimed' AND lease_until <= %s RETURNING {_COLUMNS}"
)
_CANCEL = (
    "UPDATE tasks SET state = 'cancelled', ended_at = %s WHERE key = %s AND attempt = %s AND "  # noqa: S608
    f"state IN ('due', 'claimed') RETURNING {_COLUMNS}"
)
_SELECT_TASK = f"SELECT {_COLUMNS} FROM tasks WHERE key = %s AND attempt = %s"  # noqa: S608
# A process's tasks are keyed `<process id>/<step>...`: the key range takes the (key,
# attempt) index, where `process = %s` would read the whole table.
_CANCEL_OF_PROCESS = (
    "UPDATE tasks SET state = 'cancelled', ended_at = %s WHERE key > %s AND key < %s AND "
    "state IN ('due', 'claimed')"
)


def _record(row: tuple[Any, ...]) -> TaskRecord:
    (seq, process, key, attempt, queue, state, lease, payload, delivery, worker) = row[:10]
    lease_until, output, error, retryable = row[10:]
    return TaskRecord(
        seq=seq,
        process=process,
        key=key,
        attempt=attempt,
        queue=queue,
        state=TaskState(state),
        lease=lease,
        payload=bytes(payload),
        delivery=delivery,
        worker=worker,
        lease_until=lease_until,
        output=orjson.loads(output) if output is not None else None,
        error=error,
        retryable=retryable,
    )


def _refusal(conn: Connection, delivery: str) -> Refusal:
    known = conn.execute("SELECT 1 FROM tasks WHERE delivery = %s", [delivery]).fetchone()
    return "stale" if known else "unknown"


def write_end(conn: Connection, end: TaskEnd) -> None:
    """End a claimed task inside another write's transaction (the step's checkpoint);
    `ClaimLost` when the claim is no longer open, so the whole checkpoint rolls back."""
    output = orjson.dumps(end.output).decode() if end.state == TaskState.DONE else None
    args = (end.state, output, end.error, end.retryable, end.ended_at, end.delivery)
    if conn.execute(_ANSWER, args).fetchone() is None:
        raise ClaimLost(f"task delivery {end.delivery!r} is no longer an open claim")


def cancel_open_in(conn: Connection, process_id: str, now: float) -> None:
    """Cancel every task of the process still due or claimed, inside the transaction of
    its last checkpoint: nothing of a finished process is handed out or answered 2xx."""
    conn.execute(_CANCEL_OF_PROCESS, (now, f"{process_id}/", f"{process_id}0"))


def open_in(
    conn: Connection, task: NewTask, claim_for: str | None, now: float | None
) -> tuple[TaskRecord, bool]:
    """`PgTaskStore.open` inside a transaction (its own, or the step's checkpoint)."""
    claimed = now is not None
    args = (
        task.process,
        task.key,
        task.attempt,
        task.queue,
        TaskState.CLAIMED if claimed else TaskState.DUE,
        task.lease,
        task.payload,
        task.created_at,
        claimed,
        claim_for if claimed else None,
        now + task.lease if now is not None else None,
    )
    row = conn.execute(_OPEN, args).fetchone()
    if row is not None:
        return _record(row), True
    found = conn.execute(_SELECT_TASK, (task.key, task.attempt)).fetchone()
    assert found is not None  # the conflict that skipped the insert is this row
    return _record(found), False


class PgTaskStore:
    """The `TaskStore` (workflows/abc.py) in the cluster's PostgreSQL. Writes go through
    the group-committing writer: a busy queue's claims and answers share COMMITs."""

    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("tasks", MIGRATIONS)

    async def open(
        self, task: NewTask, *, claim_for: str | None = None, now: float | None = None
    ) -> tuple[TaskRecord, bool]:
        return await self._db.write(lambda conn: open_in(conn, task, claim_for, now))

    async def release(self, delivery: str) -> TaskRecord | None:
        return await self._db.write(lambda conn: _one(conn, _RELEASE, (delivery,)))

    async def claim(
        self, queue: str, worker: str | None, limit: int, now: float
    ) -> list[TaskRecord]:
        def write(conn: Connection) -> list[TaskRecord]:
            rows = conn.execute(_CLAIM, (queue, limit, worker, now)).fetchall()
            return sorted((_record(r) for r in rows), key=lambda r: r.seq)

        return await self._db.write(write)

    async def complete(self, delivery: str, output: Any, now: float) -> TaskRecord | Refusal:
        encoded = orjson.dumps(output).decode()
        return await self._answer(delivery, (TaskState.DONE, encoded, None, False, now, delivery))

    async def fail(
        self, delivery: str, error: str, retryable: bool, now: float
    ) -> TaskRecord | Refusal:
        return await self._answer(
            delivery, (TaskState.FAILED, None, error, retryable, now, delivery)
        )

    async def _answer(self, delivery: str, args: tuple[Any, ...]) -> TaskRecord | Refusal:
        def write(conn: Connection) -> TaskRecord | Refusal:
            return _one(conn, _ANSWER, args) or _refusal(conn, delivery)

        return await self._db.write(write)

    async def heartbeat(self, delivery: str, now: float) -> TaskRecord | Refusal:
        def write(conn: Connection) -> TaskRecord | Refusal:
            return _one(conn, _HEARTBEAT, (now, delivery)) or _refusal(conn, delivery)

        return await self._db.write(write)

    async def expire(self, delivery: str, now: float) -> TaskRecord | None:
        return await self._db.write(lambda conn: _one(conn, _EXPIRE, (now, delivery, now)))

    async def cancel(self, key: str, attempt: int, now: float) -> TaskRecord | None:
        def write(conn: Connection) -> TaskRecord | None:
            # Already ended (or never opened): as it is.
            cancelled = _one(conn, _CANCEL, (now, key, attempt))
            return cancelled or _one(conn, _SELECT_TASK, (key, attempt))

        return await self._db.write(write)

    async def queue_of(self, delivery: str) -> str | None:
        def read(conn: Connection) -> str | None:
            row = conn.execute("SELECT queue FROM tasks WHERE delivery = %s", [delivery]).fetchone()
            return str(row[0]) if row is not None else None

        return await self._db.read(read)

    async def depths(self) -> dict[str, int]:
        def read(conn: Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT queue, count(*) FROM tasks WHERE state = 'due' GROUP BY queue"
            ).fetchall()
            return {queue: n for queue, n in rows}

        return await self._db.read(read)

    async def prune(self, before: float) -> int:
        def write(conn: Connection) -> int:
            return conn.execute("DELETE FROM tasks WHERE ended_at < %s", [before]).rowcount

        return await self._db.write(write)


def _one(conn: Connection, statement: str, args: tuple[Any, ...]) -> TaskRecord | None:
    row = conn.execute(statement, args).fetchone()
    return _record(row) if row is not None else None
