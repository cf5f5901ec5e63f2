"""Processes, their history and published events in the daemon's SQLite file.

A process row is the checkpoint: which step is next (`position`), how many
attempts it has had, when it wakes (`wake_at`: a delay, a retry's backoff or
a wait's timeout; the durable timer), and the outputs so far. Each step's
outcome is written (row and history in one transaction) before the next
step starts, so a restart resumes from the last outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlite_utils

from registry import Transactor
from workflows.states import (
    FINAL,
    STATUSES,
    AttemptKind,
    AttemptOutcome,
    ProcessStatus,
)

__all__ = ["FINAL", "STATUSES", "Attempt", "NewEvent", "Process", "ProcessStore", "StoredEvent"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
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
    UNIQUE (workflow, idempotency_key)
);
CREATE INDEX IF NOT EXISTS processes_open ON processes (status) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS processes_workflow ON processes (workflow, seq);
CREATE INDEX IF NOT EXISTS processes_status ON processes (status, seq);
CREATE INDEX IF NOT EXISTS processes_finished ON processes (finished_at);
CREATE TABLE IF NOT EXISTS process_history (
    process INTEGER NOT NULL,
    n INTEGER NOT NULL,
    step TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    instance TEXT,
    http_status INTEGER,
    PRIMARY KEY (process, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    data TEXT NOT NULL,
    key TEXT UNIQUE,
    published_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_topic ON events (topic, seq);
CREATE INDEX IF NOT EXISTS events_published ON events (published_at);
"""

_COLUMNS = (
    "id, workflow, status, input, outputs, idempotency_key, created_at, updated_at, "
    "finished_at, deadline_at, deadline_missed, position, attempt, wake_at, wait_seq, "
    "compensating_from, cancel_requested, error"
)


_MARKS = ", ".join("?" * 18)
# Built from the constants above only (no input reaches these strings).
_SELECT = f"SELECT seq, {_COLUMNS}"
_INSERT = f"INSERT INTO processes ({_COLUMNS}) VALUES ({_MARKS})"  # noqa: S608
_UPDATE = f"UPDATE processes SET ({_COLUMNS}) = ({_MARKS}) WHERE seq = ?"  # noqa: S608
_HISTORY_COUNT = "(SELECT count(*) FROM process_history h WHERE h.process = processes.seq)"
_SELECT_OPEN = f"{_SELECT}, {_HISTORY_COUNT} FROM processes WHERE finished_at IS NULL ORDER BY seq"
_HISTORY_OF_OLD = (
    "DELETE FROM process_history WHERE process IN (SELECT seq FROM processes WHERE finished_at < ?)"
)


@dataclass(slots=True)
class Attempt:
    """One line of a process's history."""

    step: str
    kind: AttemptKind
    attempt: int
    started_at: float
    ended_at: float
    outcome: AttemptOutcome
    error: str | None = None
    instance: str | None = None
    http_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "kind": self.kind,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "error": self.error,
            "instance": self.instance,
            "http_status": self.http_status,
        }


@dataclass(slots=True)
class Process:
    """A process's checkpointed state (the row), plus its database sequence number."""

    id: str
    workflow: str
    status: ProcessStatus
    input: dict[str, Any]
    outputs: dict[str, Any]
    idempotency_key: str | None
    created_at: float
    updated_at: float
    finished_at: float | None = None
    deadline_at: float | None = None
    deadline_missed: bool = False
    position: int = 0
    attempt: int = 0
    wake_at: float | None = None
    wait_seq: int | None = None
    compensating_from: int | None = None
    cancel_requested: bool = False
    error: str | None = None
    seq: int = 0
    history_count: int = 0
    pending: list[Attempt] = field(default_factory=list)  # history not yet written

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.workflow,
            self.status,
            orjson.dumps(self.input).decode(),
            orjson.dumps(self.outputs).decode(),
            self.idempotency_key,
            self.created_at,
            self.updated_at,
            self.finished_at,
            self.deadline_at,
            int(self.deadline_missed),
            self.position,
            self.attempt,
            self.wake_at,
            self.wait_seq,
            self.compensating_from,
            int(self.cancel_requested),
            self.error,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow": self.workflow,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "deadline_at": self.deadline_at,
            "deadline_missed": self.deadline_missed,
            "error": self.error,
        }


def _process(row: tuple[Any, ...]) -> Process:
    (seq, id_, workflow, status, input_, outputs, key, created, updated, finished) = row[:10]
    (deadline, missed, position, attempt, wake, wait_seq, compensating, cancel, error) = row[10:19]
    return Process(
        id_,
        workflow,
        ProcessStatus(status),
        orjson.loads(input_),
        orjson.loads(outputs),
        key,
        created,
        updated,
        finished,
        deadline,
        bool(missed),
        position,
        attempt,
        wake,
        wait_seq,
        compensating,
        bool(cancel),
        error,
        seq,
        row[19],  # every query selects the history count (or 0) last
    )


def _attempt(row: tuple[Any, ...]) -> Attempt:
    step, kind, attempt, started, ended, outcome, error, instance, http_status = row
    return Attempt(
        step,
        AttemptKind(kind),
        attempt,
        started,
        ended,
        AttemptOutcome(outcome),
        error,
        instance,
        http_status,
    )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    topic: str
    data: dict[str, Any]
    published_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    seq: int  # the bus reserved it: stored and live events share one id sequence
    topic: str
    data: bytes  # JSON, encoded once at publish: the stored row is the event as published
    key: str
    published_at: float


class ProcessStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        def create(d: sqlite_utils.Database) -> None:
            # One statement at a time: executescript would commit the group's transaction.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                d.conn.execute(statement)

        await self._db.write(create)

    async def create(
        self, processes: list[Process], event: NewEvent | None
    ) -> tuple[list[tuple[Process, bool]], int | None]:
        """Insert new processes (and the event that started them) in one transaction.

        A process whose (workflow, idempotency_key) exists is not inserted; the
        stored one is returned in its place, marked not new. An event whose key
        exists (a publish step run again after a crash) is not stored twice.
        """

        def write(d: sqlite_utils.Database) -> tuple[list[tuple[Process, bool]], int | None]:
            conn, seq = d.conn, None
            if event is not None:
                cursor = conn.execute(
                    "INSERT INTO events (seq, topic, data, key, published_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
                    (event.seq, event.topic, event.data.decode(), event.key, event.published_at),
                )
                seq = event.seq if cursor.rowcount else None
            out = []
            for process in processes:
                if process.idempotency_key is not None:
                    row = conn.execute(
                        _SELECT + ", 0 FROM processes WHERE workflow = ? AND idempotency_key = ?",
                        (process.workflow, process.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        out.append((_process(row), False))
                        continue
                cursor = conn.execute(_INSERT, process.row())
                process.seq = int(cursor.lastrowid or 0)
                out.append((process, True))
            return out, seq

        return await self._db.write(write)

    async def checkpoint(self, process: Process) -> None:
        """The row and the history gathered since the last checkpoint, atomically."""
        history, process.pending = process.pending, []
        first = process.history_count
        process.history_count += len(history)
        row, seq = process.row(), process.seq

        def write(d: sqlite_utils.Database) -> None:
            d.conn.execute(_UPDATE, (*row, seq))
            if history:
                d.conn.executemany(
                    "INSERT INTO process_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            seq,
                            first + n,
                            a.step,
                            a.kind,
                            a.attempt,
                            a.started_at,
                            a.ended_at,
                            a.outcome,
                            a.error,
                            a.instance,
                            a.http_status,
                        )
                        for n, a in enumerate(history)
                    ],
                )

        await self._db.write(write)

    async def unfinished(self) -> list[Process]:
        def read(d: sqlite_utils.Database) -> list[Process]:
            rows = d.execute(_SELECT_OPEN).fetchall()
            return [_process(r) for r in rows]

        return await self._db.read(read)

    async def get(self, process_id: str) -> tuple[Process, list[Attempt]] | None:
        def read(d: sqlite_utils.Database) -> tuple[Process, list[Attempt]] | None:
            row = d.execute(_SELECT + ", 0 FROM processes WHERE id = ?", [process_id]).fetchone()
            if row is None:
                return None
            history = d.execute(
                "SELECT step, kind, attempt, started_at, ended_at, outcome, error, instance, "
                "http_status FROM process_history WHERE process = ? ORDER BY n",
                [row[0]],
            ).fetchall()
            return _process(row), [_attempt(h) for h in history]

        return await self._db.read(read)

    async def page(
        self, workflow: str | None, status: ProcessStatus | None, limit: int, before: int | None
    ) -> list[Process]:
        """Newest first; `before` is the cursor (a sequence number)."""
        where: list[str] = []
        args: list[str | int] = []
        for column, value in (("workflow", workflow), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""

        def read(d: sqlite_utils.Database) -> list[Process]:
            rows = d.execute(
                _SELECT + f", 0 FROM processes {clause} ORDER BY seq DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
            return [_process(r) for r in rows]

        return await self._db.read(read)

    async def counts(self) -> dict[tuple[str, ProcessStatus], int]:
        def read(d: sqlite_utils.Database) -> dict[tuple[str, ProcessStatus], int]:
            rows = d.execute(
                "SELECT workflow, status, count(*) FROM processes GROUP BY workflow, status"
            ).fetchall()
            return {(w, ProcessStatus(s)): n for w, s, n in rows}

        return await self._db.read(read)

    async def events_since(self, topic: str, seq: int) -> list[StoredEvent]:
        def read(d: sqlite_utils.Database) -> list[StoredEvent]:
            rows = d.execute(
                "SELECT seq, topic, data, published_at FROM events "
                "WHERE topic = ? AND seq > ? ORDER BY seq",
                [topic, seq],
            ).fetchall()
            return [StoredEvent(s, t, orjson.loads(data), at) for s, t, data, at in rows]

        return await self._db.read(read)

    async def events_after(
        self, seq: int, upto: int, limit: int
    ) -> list[tuple[int, str, bytes, float]]:
        """Stored events with `seq < id <= upto`, oldest first, as (id, topic, JSON, time)."""

        def read(d: sqlite_utils.Database) -> list[tuple[int, str, bytes, float]]:
            rows = d.execute(
                "SELECT seq, topic, data, published_at FROM events "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                [seq, upto, limit],
            ).fetchall()
            return [(s, t, data.encode(), at) for s, t, data, at in rows]

        return await self._db.read(read)

    async def last_event_seq(self) -> int:
        """The highest event id ever stored, pruned or not (sqlite_sequence remembers), so
        ids are never given twice and a client's Last-Event-ID keeps its meaning."""

        def read(d: sqlite_utils.Database) -> int:
            row = d.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM events), 0), coalesce("
                "(SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))"
            ).fetchone()
            return int(row[0])

        return await self._db.read(read)

    async def outcomes(self, workflow: str, since: float) -> list[tuple[int, int, int]]:
        """(minute, good, valid) per minute for the workflow SLO: a process counts once,
        bad at its missed deadline, else at its end (good when completed)."""

        def read(d: sqlite_utils.Database) -> list[tuple[int, int, int]]:
            return d.execute(
                "SELECT CAST(at / 60 AS INTEGER) AS minute, sum(good), count(*) FROM ("
                "  SELECT CASE WHEN deadline_missed THEN deadline_at ELSE finished_at END AS at,"
                "         (status = 'completed' AND NOT deadline_missed) AS good"
                "  FROM processes"
                "  WHERE workflow = ? AND (deadline_missed OR finished_at IS NOT NULL)"
                ") WHERE at >= ? GROUP BY minute ORDER BY minute",
                [workflow, since],
            ).fetchall()

        return await self._db.read(read)

    async def prune(
        self, before: float, events_before: float
    ) -> dict[tuple[str, ProcessStatus], int]:
        """Forget processes finished before `before` and events published before
        `events_before`; what went."""

        def write(d: sqlite_utils.Database) -> dict[tuple[str, ProcessStatus], int]:
            conn = d.conn
            gone = conn.execute(
                "SELECT workflow, status, count(*) FROM processes WHERE finished_at < ? "
                "GROUP BY workflow, status",
                [before],
            ).fetchall()
            conn.execute(_HISTORY_OF_OLD, [before])
            conn.execute("DELETE FROM processes WHERE finished_at < ?", [before])
            conn.execute("DELETE FROM events WHERE published_at < ?", [events_before])
            return {(w, ProcessStatus(s)): n for w, s, n in gone}

        return await self._db.write(write)
