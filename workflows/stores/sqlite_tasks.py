"""Task steps waiting for workers, in the daemon's SQLite file (its own table).

A row is one attempt of a task step: `due` until a poll claims it, `claimed`
(a delivery id, a worker, a lease end) until the worker answers or the lease
passes, then final. The claim is one UPDATE over a sub-select; on PostgreSQL
the same statement takes the sub-select `FOR UPDATE SKIP LOCKED`, as Oban and
Procrastinate claim jobs, so concurrent pollers never get the same task.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
import sqlite_utils

from registry import Transactor
from workflows.abc import NewTask, Refusal, TaskRecord
from workflows.records import TaskEnd
from workflows.states import TaskState

__all__ = ["SqliteTaskStore", "cancel_open_in", "open_in", "write_end"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    process TEXT NOT NULL,
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    lease REAL NOT NULL,
    payload BLOB NOT NULL,
    delivery TEXT UNIQUE,
    worker TEXT,
    lease_until REAL,
    output TEXT,
    error TEXT,
    retryable INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    ended_at REAL,
    UNIQUE (key, attempt)
);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (queue, seq) WHERE state = 'due';
CREATE INDEX IF NOT EXISTS tasks_ended ON tasks (ended_at);
"""

_COLUMNS = (
    "seq, process, key, attempt, queue, state, lease, payload, delivery, worker, lease_until, "
    "output, error, retryable"
)
# Built from the constants above only (no input reaches these strings).
_OPEN = (
    "INSERT INTO tasks (process, key, attempt, queue, state, lease, payload, created_at, "  # noqa: S608
    "delivery, worker, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    f"ON CONFLICT (key, attempt) DO NOTHING RETURNING {_COLUMNS}"
)
_RELEASE = (
    "UPDATE tasks SET state = 'due', delivery = NULL, worker = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE delivery = ? AND state = 'claimed' RETURNING {_COLUMNS}"
)
_CLAIM = (
    "UPDATE tasks SET state = 'claimed', delivery = lower(hex(randomblob(12))), worker = ?, "  # noqa: S608
    "lease_until = ? + lease WHERE seq IN (SELECT seq FROM tasks WHERE queue = ? AND "
    f"state = 'due' ORDER BY seq LIMIT ?) RETURNING {_COLUMNS}"
)
_ANSWER = (
    "UPDATE tasks SET state = ?, output = ?, error = ?, retryable = ?, ended_at = ? "  # noqa: S608
    f"WHERE delivery = ? AND state = 'claimed' RETURNING {_COLUMNS}"
)
_HEARTBEAT = (
    "UPDATE tasks SET lease_until = ? + lease WHERE delivery = ? AND state = 'claimed' "  # noqa: S608
    f"RETURNING {_COLUMNS}"
)
_EXPIRE = (
    "UPDATE tasks SET state = 'expired', ended_at = ? WHERE delivery = ? AND "  # noqa: S608
    f"state = 'claimed' AND lease_until <= ? RETURNING {_COLUMNS}"
)
_CANCEL = (
    "UPDATE tasks SET state = 'cancelled', ended_at = ? WHERE key = ? AND attempt = ? AND "  # noqa: S608
    f"state IN ('due', 'claimed') RETURNING {_COLUMNS}"
)
_SELECT_TASK = f"SELECT {_COLUMNS} FROM tasks WHERE key = ? AND attempt = ?"  # noqa: S608
# A process's tasks are keyed `<process id>/<step>...`: the key range takes the (key,
# attempt) index, where `process = ?` would read the whole table.
_CANCEL_OF_PROCESS = (
    "UPDATE tasks SET state = 'cancelled', ended_at = ? WHERE key > ? AND key < ? AND "
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
        retryable=bool(retryable),
    )


def _refusal(d: sqlite_utils.Database, delivery: str) -> Refusal:
    known = d.conn.execute("SELECT 1 FROM tasks WHERE delivery = ?", [delivery]).fetchone()
    return "stale" if known else "unknown"


class ClaimLost(RuntimeError):
    """A task end written with a checkpoint found its claim no longer open: the whole
    checkpoint rolls back (the daemon's memory disagreed with the table)."""


def write_end(d: sqlite_utils.Database, end: TaskEnd) -> None:
    """End a claimed task inside another write's transaction (the step's checkpoint)."""
    output = orjson.dumps(end.output).decode() if end.state == TaskState.DONE else None
    args = (end.state, output, end.error, int(end.retryable), end.ended_at, end.delivery)
    if d.conn.execute(_ANSWER, args).fetchone() is None:
        raise ClaimLost(f"task delivery {end.delivery!r} is no longer an open claim")


def cancel_open_in(d: sqlite_utils.Database, process_id: str, now: float) -> None:
    """Cancel every task of the process still due or claimed, inside the transaction of
    its last checkpoint: nothing of a finished process is handed out or answered 2xx
    (one that failed inside the engine may have opened its next task already)."""
    d.conn.execute(_CANCEL_OF_PROCESS, (now, f"{process_id}/", f"{process_id}0"))


def open_in(
    d: sqlite_utils.Database, task: NewTask, claim_for: str | None, now: float | None
) -> tuple[TaskRecord, bool]:
    """`SqliteTaskStore.open` inside a transaction (its own, or the step's checkpoint)."""
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
        secrets.token_hex(12) if claimed else None,
        claim_for if claimed else None,
        now + task.lease if now is not None else None,
    )
    row = d.conn.execute(_OPEN, args).fetchone()
    if row is not None:
        return _record(row), True
    return _record(d.conn.execute(_SELECT_TASK, (task.key, task.attempt)).fetchone()), False


class SqliteTaskStore:
    """The `TaskStore` (workflows/abc.py) in the daemon's SQLite file. Every write goes
    through the group-committing writer, so a busy queue shares fsyncs with the steps."""

    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        def create(d: sqlite_utils.Database) -> None:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                d.conn.execute(statement)

        await self._db.write(create)

    async def open(
        self, task: NewTask, *, claim_for: str | None = None, now: float | None = None
    ) -> tuple[TaskRecord, bool]:
        return await self._db.write(lambda d: open_in(d, task, claim_for, now))

    async def release(self, delivery: str) -> TaskRecord | None:
        def write(d: sqlite_utils.Database) -> TaskRecord | None:
            row = d.conn.execute(_RELEASE, (delivery,)).fetchone()
            return _record(row) if row is not None else None

        return await self._db.write(write)

    async def claim(
        self, queue: str, worker: str | None, limit: int, now: float
    ) -> list[TaskRecord]:
        def write(d: sqlite_utils.Database) -> list[TaskRecord]:
            rows = d.conn.execute(_CLAIM, (worker, now, queue, limit)).fetchall()
            return sorted((_record(r) for r in rows), key=lambda r: r.seq)

        return await self._db.write(write)

    async def complete(self, delivery: str, output: Any, now: float) -> TaskRecord | Refusal:
        encoded = orjson.dumps(output).decode()
        return await self._answer(delivery, (TaskState.DONE, encoded, None, 0, now, delivery))

    async def fail(
        self, delivery: str, error: str, retryable: bool, now: float
    ) -> TaskRecord | Refusal:
        return await self._answer(
            delivery, (TaskState.FAILED, None, error, int(retryable), now, delivery)
        )

    async def _answer(self, delivery: str, args: tuple[Any, ...]) -> TaskRecord | Refusal:
        def write(d: sqlite_utils.Database) -> TaskRecord | Refusal:
            row = d.conn.execute(_ANSWER, args).fetchone()
            return _record(row) if row is not None else _refusal(d, delivery)

        return await self._db.write(write)

    async def heartbeat(self, delivery: str, now: float) -> TaskRecord | Refusal:
        def write(d: sqlite_utils.Database) -> TaskRecord | Refusal:
            row = d.conn.execute(_HEARTBEAT, (now, delivery)).fetchone()
            return _record(row) if row is not None else _refusal(d, delivery)

        return await self._db.write(write)

    async def expire(self, delivery: str, now: float) -> TaskRecord | None:
        def write(d: sqlite_utils.Database) -> TaskRecord | None:
            row = d.conn.execute(_EXPIRE, (now, delivery, now)).fetchone()
            return _record(row) if row is not None else None

        return await self._db.write(write)

    async def cancel(self, key: str, attempt: int, now: float) -> TaskRecord | None:
        def write(d: sqlite_utils.Database) -> TaskRecord | None:
            row = d.conn.execute(_CANCEL, (now, key, attempt)).fetchone()
            if row is None:  # already ended (or never opened): as it is
                row = d.conn.execute(_SELECT_TASK, (key, attempt)).fetchone()
            return _record(row) if row is not None else None

        return await self._db.write(write)

    async def queue_of(self, delivery: str) -> str | None:
        def read(d: sqlite_utils.Database) -> str | None:
            row = d.execute("SELECT queue FROM tasks WHERE delivery = ?", [delivery]).fetchone()
            return str(row[0]) if row is not None else None

        return await self._db.read(read)

    async def depths(self) -> dict[str, int]:
        def read(d: sqlite_utils.Database) -> dict[str, int]:
            rows = d.execute(
                "SELECT queue, count(*) FROM tasks WHERE state = 'due' GROUP BY queue"
            ).fetchall()
            return {queue: n for queue, n in rows}

        return await self._db.read(read)

    async def prune(self, before: float) -> int:
        def write(d: sqlite_utils.Database) -> int:
            return d.conn.execute("DELETE FROM tasks WHERE ended_at < ?", [before]).rowcount

        return await self._db.write(write)
