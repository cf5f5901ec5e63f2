"""Processes, their history and published events in the daemon's SQLite file.

A process row is the checkpoint: which step is next (`position`), how many
attempts it has had, when it wakes (`wake_at`: a delay, a retry's backoff or
a wait's timeout; the durable timer), and the outputs so far. Each step's
outcome is written (row and history in one transaction) before the next
step starts, so a restart resumes from the last outcome. The row also says
when the engine must hold the process in memory again (`due_at`) and the
event it waits for (`wait_*`): the engine keeps in memory only those due soon.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import sqlite_utils

from registry import Transactor
from workflows.abc import ScheduleMark, TaskRecord
from workflows.errors import Fenced
from workflows.records import (
    Attempt,
    NewEvent,
    Process,
    Signal,
    Staged,
    StoredDefinition,
    StoredEvent,
    branches_json,
    match_key,
    stored_branches,
    stored_failure,
)
from workflows.states import AttemptKind, AttemptOutcome, ProcessStatus

from .sqlite_schedules import write_mark
from .sqlite_tasks import cancel_open_in, open_in, write_end

__all__ = ["SqliteWorkflowStore"]


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
    output TEXT,
    workflow_version INTEGER NOT NULL DEFAULT 1,
    branches TEXT,
    owner TEXT,
    due_at REAL,
    wait_topic TEXT,
    wait_keys TEXT,
    wait_match TEXT,
    started_by TEXT,
    cancelled_by TEXT,
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
    signalled_by TEXT,
    PRIMARY KEY (process, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    data TEXT NOT NULL,
    key TEXT UNIQUE,
    published_at REAL NOT NULL,
    actor TEXT
);
CREATE INDEX IF NOT EXISTS events_topic ON events (topic, seq);
CREATE TABLE IF NOT EXISTS workflow_definitions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    defined_at REAL NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS process_signals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    process TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    sent_at REAL NOT NULL,
    sent_by TEXT
);
CREATE INDEX IF NOT EXISTS process_signals_process ON process_signals (process, seq);
CREATE INDEX IF NOT EXISTS events_published ON events (published_at);
"""
# After the columns they index exist (a file written before gets them at open). Partial:
# the engine reads only unfinished processes by them, and most rows are finished.
_INDEXES = """
CREATE INDEX IF NOT EXISTS processes_due ON processes (due_at, seq)
    WHERE finished_at IS NULL AND due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS processes_waiting ON processes (wait_topic, wait_keys, wait_match)
    WHERE finished_at IS NULL AND wait_topic IS NOT NULL;
"""

# What a checkpoint writes; `owner` is written by create and claim_orphans only.
_STATE = (
    "id, workflow, status, input, outputs, idempotency_key, created_at, updated_at, "
    "finished_at, deadline_at, deadline_missed, position, attempt, wake_at, wait_seq, "
    "compensating_from, cancel_requested, error, output, workflow_version, branches, "
    "due_at, wait_topic, wait_keys, wait_match, started_by, cancelled_by"
)
_COLUMNS = f"{_STATE}, owner"
# Columns added since the first release, by table: a file written before gets them at open.
_ADDED_COLUMNS = {
    "processes": {
        "output": "TEXT",
        "workflow_version": "INTEGER NOT NULL DEFAULT 1",
        "branches": "TEXT",  # parallel steps' branch states (JSON); NULL: none
        "owner": "TEXT",  # the member key running it (workflows/records.py Process.owner)
        # Residency (Process.due_at, the event it waits for); see _BACKFILL.
        "due_at": "REAL",
        "wait_topic": "TEXT",
        "wait_keys": "TEXT",
        "wait_match": "TEXT",
        # Who started and who cancelled it (names, never tokens); NULL on older rows.
        "started_by": "TEXT",
        "cancelled_by": "TEXT",
    },
    "process_history": {"signalled_by": "TEXT"},  # who sent the signal a wait step took
    "process_signals": {"sent_by": "TEXT"},
    "events": {"actor": "TEXT"},  # who published it
}
# Processes stored before due_at existed would never be due (the engine loads by it):
# due at their last checkpoint, so the next open loads each and its checkpoint sets it.
_BACKFILL = {"due_at": "UPDATE processes SET due_at = updated_at WHERE finished_at IS NULL"}


_MARKS = ", ".join("?" * len(_STATE.split(",")))
# Built from the constants above only (no input reaches these strings).
_SELECT = f"SELECT seq, {_COLUMNS}"
_INSERT = f"INSERT INTO processes ({_COLUMNS}) VALUES ({_MARKS}, ?)"  # noqa: S608
_HISTORY = (
    "step, kind, attempt, started_at, ended_at, outcome, error, instance, http_status, signalled_by"
)
# Fenced: the row is written only while it names the checkpoint's owner.
_UPDATE = f"UPDATE processes SET ({_STATE}) = ({_MARKS}) WHERE seq = ? AND owner IS ?"  # noqa: S608
_HISTORY_COUNT = "(SELECT count(*) FROM process_history h WHERE h.process = processes.seq)"
_SELECT_OPEN = f"{_SELECT}, {_HISTORY_COUNT} FROM processes WHERE finished_at IS NULL ORDER BY seq"
_CLAIM = (
    "UPDATE processes SET owner = ? WHERE seq IN (SELECT seq FROM processes "  # noqa: S608
    "WHERE finished_at IS NULL AND owner IN (SELECT value FROM json_each(?)) "
    f"ORDER BY seq LIMIT ?) RETURNING seq, {_COLUMNS}, {_HISTORY_COUNT}"
)
_TAKE_OVER = (
    "UPDATE processes SET owner = ? WHERE finished_at IS NULL AND owner IS NOT ? "
    "AND (due_at <= ? OR (due_at IS NULL AND updated_at >= ?))"
)
# The residency reads name their index: without statistics SQLite takes `finished_at IS
# NULL` for a selective equality and walks processes_finished over every unfinished row
# (a million when few are due). A partial index serves only a WHERE that has its terms.
_DUE_FROM = (
    f"{_SELECT}, {_HISTORY_COUNT} FROM processes INDEXED BY processes_due "
    "WHERE finished_at IS NULL AND due_at IS NOT NULL AND due_at <= ?"
)
_DUE = f"{_DUE_FROM} ORDER BY due_at, seq LIMIT ?"
# After a cursor: `(due_at, seq) > (?, ?)` as two seeks, the ties at the cursor's due_at
# past its seq, then the later due_at. SQLite seeks a row value on its first column only
# and would walk every tie before the cursor on each page (a burst due at one instant).
_DUE_AFTER = (
    f"SELECT * FROM ({_DUE_FROM} AND due_at = ? AND seq > ? ORDER BY seq LIMIT ?) "  # noqa: S608
    f"UNION ALL SELECT * FROM ({_DUE_FROM} AND due_at > ? ORDER BY due_at, seq LIMIT ?) "
    "ORDER BY due_at, seq LIMIT ?"
)
# By id: `+` keeps finished_at off the index choice (the unary plus of SQLite's planner).
_UNFINISHED_OF = (
    f"{_SELECT}, {_HISTORY_COUNT} FROM processes "  # noqa: S608
    "WHERE id IN (SELECT value FROM json_each(?)) AND +finished_at IS NULL ORDER BY seq"
)
_WAITING_KEYS = (
    "SELECT DISTINCT wait_topic, wait_keys FROM processes INDEXED BY processes_waiting "
    "WHERE finished_at IS NULL AND wait_topic IS NOT NULL"
)
_WAITERS = (
    "SELECT id FROM processes INDEXED BY processes_waiting "
    "WHERE finished_at IS NULL AND wait_topic IS NOT NULL "
    "AND wait_topic = ? AND wait_keys = ? AND wait_match = ? LIMIT ?"
)
# An event or a signal makes the processes it may end a wait of due now (never later).
_WAKE_WAITERS = (
    "UPDATE processes SET due_at = ? WHERE finished_at IS NULL AND wait_topic = ? "
    "AND wait_keys = ? AND wait_match = ? AND (due_at IS NULL OR due_at > ?)"
)
_WAKE_SIGNALLED = (
    "UPDATE processes SET due_at = ? WHERE id = ? AND finished_at IS NULL "
    "AND (due_at IS NULL OR due_at > ?)"
)
_HISTORY_OF_OLD = (
    "DELETE FROM process_history WHERE process IN (SELECT seq FROM processes WHERE finished_at < ?)"
)


def _row(process: Process) -> tuple[Any, ...]:
    return (
        process.id,
        process.workflow,
        process.status,
        orjson.dumps(process.input).decode(),
        orjson.dumps(process.outputs).decode(),
        process.idempotency_key,
        process.created_at,
        process.updated_at,
        process.finished_at,
        process.deadline_at,
        int(process.deadline_missed),
        process.position,
        process.attempt,
        process.wake_at,
        process.wait_seq,
        process.compensating_from,
        int(process.cancel_requested),
        None if process.error is None else orjson.dumps(process.error).decode(),
        None if process.output is None else orjson.dumps(process.output).decode(),
        process.workflow_version,
        branches_json(process.branches),
        process.due_at,
        process.wait_topic,
        process.wait_keys,
        process.wait_match,
        process.started_by,
        process.cancelled_by,
    )


def _process(row: tuple[Any, ...]) -> Process:
    (seq, id_, workflow, status, input_, outputs, key, created, updated, finished) = row[:10]
    (deadline, missed, position, attempt, wake, wait_seq, compensating, cancel, error) = row[10:19]
    output, version, branches, due, topic, keys, match, started_by, cancelled_by = row[19:28]
    return Process(
        id=id_,
        workflow=workflow,
        status=ProcessStatus(status),
        input=orjson.loads(input_),
        outputs=orjson.loads(outputs),
        idempotency_key=key,
        created_at=created,
        updated_at=updated,
        finished_at=finished,
        deadline_at=deadline,
        deadline_missed=bool(missed),
        position=position,
        attempt=attempt,
        wake_at=wake,
        wait_seq=wait_seq,
        compensating_from=compensating,
        cancel_requested=bool(cancel),
        error=stored_failure(error),
        output=None if output is None else orjson.loads(output),
        workflow_version=version,
        branches=stored_branches(branches),
        due_at=due,
        wait_topic=topic,
        wait_keys=keys,
        wait_match=match,
        started_by=started_by,
        cancelled_by=cancelled_by,
        owner=row[28],
        seq=seq,
        history_count=row[29],  # every query selects the history count (or 0) last
    )


def keys_of(match: str) -> str:
    """The stored `wait_keys` of processes whose `wait_match` can be `match` (its own keys,
    as records.match_key writes them), so a lookup uses the whole processes_waiting index."""
    return match_key(orjson.loads(match))[0]


def _claimed(
    d: sqlite_utils.Database, processes: list[Process], owner: str | None
) -> list[Process]:
    """The processes read, made `owner`'s (in the write that read them) when one is given."""
    if owner is not None:
        seqs = orjson.dumps([p.seq for p in processes]).decode()
        d.conn.execute(
            "UPDATE processes SET owner = ? WHERE seq IN (SELECT value FROM json_each(?))",
            [owner, seqs],
        )
        for process in processes:
            process.owner = owner
    return processes


def fenced(process: Process) -> Fenced:
    return Fenced(f"process {process.id} is no longer owned by {process.owner}")


def _stored_history(d: sqlite_utils.Database, seq: int) -> int:
    """How many history rows the process has, inside the write: the next row's number."""
    (count,) = d.conn.execute(
        "SELECT coalesce(max(n) + 1, 0) FROM process_history WHERE process = ?", [seq]
    ).fetchone()
    return int(count)


def _attempt(row: tuple[Any, ...]) -> Attempt:
    step, kind, attempt, started, ended, outcome, error, instance, http_status, by = row
    return Attempt(
        step=step,
        kind=AttemptKind(kind),
        attempt=attempt,
        started_at=started,
        ended_at=ended,
        outcome=AttemptOutcome(outcome),
        error=error,
        instance=instance,
        http_status=http_status,
        signalled_by=by,
    )


class SqliteWorkflowStore:
    """Processes, history and events in the daemon's SQLite file: a `ProcessStore` and an
    `EventStore` (workflows/abc.py) in one, so a publish and the processes it starts
    commit together."""

    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        def create(d: sqlite_utils.Database) -> None:
            # One statement at a time: executescript would commit the group's transaction.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                d.conn.execute(statement)
            for table, added in _ADDED_COLUMNS.items():
                have = {row[1] for row in d.conn.execute(f"PRAGMA table_info({table})")}
                for column, kind in added.items():
                    if column not in have:  # constants only reach this statement
                        d.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                        if column in _BACKFILL:
                            d.conn.execute(_BACKFILL[column])
            for statement in filter(str.strip, _INDEXES.split(";")):
                d.conn.execute(statement)

        await self._db.write(create)

    async def create(
        self,
        processes: list[Process],
        event: NewEvent | None,
        *,
        schedule: ScheduleMark | None = None,
    ) -> tuple[list[tuple[Process, bool]], int | None]:
        """Insert new processes (and the event that started them) in one transaction.

        A process whose (workflow, idempotency_key) exists is not inserted; the
        stored one is returned in its place, marked not new. An event whose key
        exists (a publish step run again after a crash) is not stored twice. A
        schedule's mark moves in the same transaction as its tick's process.
        """

        def write(d: sqlite_utils.Database) -> tuple[list[tuple[Process, bool]], int | None]:
            conn, seq = d.conn, None
            if event is not None:
                cursor = conn.execute(
                    "INSERT INTO events (seq, topic, data, key, published_at, actor) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
                    (
                        event.seq,
                        event.topic,
                        event.data.decode(),
                        event.key,
                        event.published_at,
                        event.actor,
                    ),
                )
                seq = event.seq if cursor.rowcount else None
                if seq is not None:
                    for match in event.wakes:  # its waiters are due now, even after a crash
                        at = event.published_at
                        conn.execute(_WAKE_WAITERS, (at, event.topic, keys_of(match), match, at))
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
                cursor = conn.execute(_INSERT, (*_row(process), process.owner))
                process.seq = int(cursor.lastrowid or 0)
                out.append((process, True))
            if schedule is not None:
                write_mark(d, schedule)
            return out, seq

        return await self._db.write(write)

    async def checkpoint(self, process: Process) -> None:
        """The row and the history gathered since the last checkpoint, atomically.

        A refused write (Overloaded, StoreUnavailable) puts the history, the taken
        signals and the task answers back, so the retry (or the next checkpoint) writes
        them: no row lost, no signal taken twice. They leave the process before the write,
        not after, so a checkpoint made meanwhile (a cancel's) does not write the same
        history rows again. Until the commit the rows are in `process.writing`, which reads
        show (Engine.describe): the process's new state is never seen without them.

        A process with branches makes checkpoints with rows concurrently: one refused
        while another commits would number its retry's rows over the other's, so its rows
        are numbered inside the write, after those stored. A single line never has two
        with rows in flight: numbered from memory, no read."""
        staged = Staged.take(process)
        history, taken, ends, opening = staged.history, staged.taken, staged.ends, staged.opening
        first = staged.first
        row, seq = _row(process), process.seq
        finished = process.finished_at if process.has_tasks else None

        def write(d: sqlite_utils.Database) -> tuple[TaskRecord, bool] | None:
            if not d.conn.execute(_UPDATE, (*row, seq, process.owner)).rowcount:
                raise fenced(process)
            for end in ends:  # the workers' answers that ended the steps, in their commit
                write_end(d, end)
            if finished is not None:  # no task of a finished process stays open
                cancel_open_in(d, process.id, finished)
            for signal in taken:  # taken once: gone with the checkpoint of the step
                d.conn.execute("DELETE FROM process_signals WHERE seq = ?", [signal])
            if history:
                start = first if first is not None else _stored_history(d, seq)
                d.conn.executemany(
                    f"INSERT INTO process_history (process, n, {_HISTORY}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            seq,
                            start + n,
                            a.step,
                            a.kind,
                            a.attempt,
                            a.started_at,
                            a.ended_at,
                            a.outcome,
                            a.error,
                            a.instance,
                            a.http_status,
                            a.signalled_by,
                        )
                        for n, a in enumerate(history)
                    ],
                )
            if opening is None:
                return None
            return open_in(d, opening.task, opening.claim_for, opening.now)

        try:
            opened = await self._db.write(write)
        except BaseException:
            staged.put_back(process)
            raise
        staged.written(process, opened)

    async def claim_orphans(
        self, owner: str, dead_owners: Sequence[str], limit: int
    ) -> list[Process]:
        """Take over the unfinished processes of dead owners, oldest first (one writer:
        a claim is one statement, never two claimers at once)."""
        dead = orjson.dumps(list(dead_owners)).decode()

        def write(d: sqlite_utils.Database) -> list[Process]:
            rows = d.conn.execute(_CLAIM, (owner, dead, limit)).fetchall()
            return sorted((_process(r) for r in rows), key=lambda p: p.seq)

        return await self._db.write(write)

    async def take_over(self, owner: str, due_before: float, updated_after: float) -> int:
        """One writer: a checkpoint of the old owner is committed before this or fenced."""

        def write(d: sqlite_utils.Database) -> int:
            args = (owner, owner, due_before, updated_after)
            return int(d.conn.execute(_TAKE_OVER, args).rowcount)

        return await self._db.write(write)

    async def due(
        self,
        after: tuple[float, int] | None,
        before: float,
        limit: int,
        owner: str | None = None,
    ) -> list[Process]:
        query, args = _DUE, [before, limit]
        if after is not None:
            at, seq = after
            query, args = _DUE_AFTER, [before, at, seq, limit, before, at, limit, limit]

        def read(d: sqlite_utils.Database) -> list[Process]:
            return _claimed(d, [_process(r) for r in d.execute(query, args).fetchall()], owner)

        return await (self._db.read(read) if owner is None else self._db.write(read))

    async def unfinished_of(self, ids: Sequence[str], owner: str | None = None) -> list[Process]:
        wanted = orjson.dumps(list(ids)).decode()

        def read(d: sqlite_utils.Database) -> list[Process]:
            rows = d.execute(_UNFINISHED_OF, [wanted]).fetchall()
            return _claimed(d, [_process(r) for r in rows], owner)

        return await (self._db.read(read) if owner is None else self._db.write(read))

    async def unfinished_of_version(self, workflow: str, version: int) -> list[str]:
        def read(d: sqlite_utils.Database) -> list[str]:
            rows = d.execute(
                "SELECT id FROM processes WHERE finished_at IS NULL AND workflow = ? "
                "AND workflow_version = ? ORDER BY seq",
                [workflow, version],
            ).fetchall()
            return [id_ for (id_,) in rows]

        return await self._db.read(read)

    async def waiting_keys(self) -> list[tuple[str, str]]:
        def read(d: sqlite_utils.Database) -> list[tuple[str, str]]:
            return [(topic, keys) for topic, keys in d.execute(_WAITING_KEYS).fetchall()]

        return await self._db.read(read)

    async def waiters(self, topic: str, match: str, limit: int) -> list[str]:
        args = (topic, keys_of(match), match, limit)

        def read(d: sqlite_utils.Database) -> list[str]:
            return [id_ for (id_,) in d.execute(_WAITERS, args).fetchall()]

        return await self._db.read(read)

    async def definitions(self) -> list[StoredDefinition]:
        def read(d: sqlite_utils.Database) -> list[StoredDefinition]:
            rows = d.execute(
                "SELECT name, version, source, spec, defined_at FROM workflow_definitions "
                "ORDER BY defined_at, name, version"
            ).fetchall()
            return [
                StoredDefinition(
                    name=n, version=v, source=s, spec=orjson.loads(spec), defined_at=at
                )
                for n, v, s, spec, at in rows
            ]

        return await self._db.read(read)

    async def add_definitions(self, definitions: list[StoredDefinition]) -> list[int]:
        """Store new versions in one transaction, each numbered there: one more than the
        highest stored version of its name (whatever its `version` says), so two writers
        never pick the same number and a version that no longer parses still counts."""

        def write(d: sqlite_utils.Database) -> list[int]:
            versions = []
            for definition in definitions:
                (version,) = d.conn.execute(
                    "INSERT INTO workflow_definitions SELECT ?, coalesce(max(version), 0) + 1, "
                    "?, ?, ? FROM workflow_definitions WHERE name = ? RETURNING version",
                    (
                        definition.name,
                        definition.source,
                        orjson.dumps(definition.spec).decode(),
                        definition.defined_at,
                        definition.name,
                    ),
                ).fetchone()
                versions.append(int(version))
            return versions

        return await self._db.write(write)

    async def add_signal(
        self, process_id: str, name: str, data: bytes, at: float, by: str | None = None
    ) -> Signal:
        def write(d: sqlite_utils.Database) -> int:
            cursor = d.conn.execute(
                "INSERT INTO process_signals (process, name, data, sent_at, sent_by) "
                "VALUES (?, ?, ?, ?, ?)",
                (process_id, name, data.decode(), at, by),
            )
            d.conn.execute(_WAKE_SIGNALLED, (at, process_id, at))  # due now, even after a crash
            return int(cursor.lastrowid or 0)

        seq = await self._db.write(write)
        return Signal(
            seq=seq, process=process_id, name=name, data=orjson.loads(data), sent_at=at, by=by
        )

    async def pending_signals(self) -> list[Signal]:
        """Signals not yet taken by unfinished processes, oldest first."""

        def read(d: sqlite_utils.Database) -> list[Signal]:
            rows = d.execute(
                "SELECT s.seq, s.process, s.name, s.data, s.sent_at, s.sent_by "
                "FROM process_signals s JOIN processes p ON p.id = s.process "
                "WHERE p.finished_at IS NULL ORDER BY s.seq"
            ).fetchall()
            return [
                Signal(seq=seq, process=p, name=n, data=orjson.loads(data), sent_at=at, by=by)
                for seq, p, n, data, at, by in rows
            ]

        return await self._db.read(read)

    async def unfinished(self) -> list[Process]:
        def read(d: sqlite_utils.Database) -> list[Process]:
            rows = d.execute(_SELECT_OPEN).fetchall()
            return [_process(r) for r in rows]

        return await self._db.read(read)

    async def by_key(self, workflow: str, idempotency_key: str) -> Process | None:
        def read(d: sqlite_utils.Database) -> Process | None:
            query = _SELECT + ", 0 FROM processes WHERE workflow = ? AND idempotency_key = ?"
            row = d.execute(query, [workflow, idempotency_key]).fetchone()
            return None if row is None else _process(row)

        return await self._db.read(read)

    async def get(self, process_id: str) -> tuple[Process, list[Attempt]] | None:
        def read(d: sqlite_utils.Database) -> tuple[Process, list[Attempt]] | None:
            row = d.execute(_SELECT + ", 0 FROM processes WHERE id = ?", [process_id]).fetchone()
            if row is None:
                return None
            history = d.execute(
                f"SELECT {_HISTORY} FROM process_history WHERE process = ? ORDER BY n",  # noqa: S608
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
                "SELECT seq, topic, data, published_at, actor FROM events "
                "WHERE topic = ? AND seq > ? ORDER BY seq",
                [topic, seq],
            ).fetchall()
            return [
                StoredEvent(seq=s, topic=t, data=orjson.loads(data), published_at=at, actor=by)
                for s, t, data, at, by in rows
            ]

        return await self._db.read(read)

    async def events_after(
        self, seq: int, upto: int, limit: int
    ) -> list[tuple[int, str, bytes, float, str | None]]:
        """Stored events with `seq < id <= upto`, oldest first, as (id, topic, JSON, time,
        actor)."""

        def read(d: sqlite_utils.Database) -> list[tuple[int, str, bytes, float, str | None]]:
            rows = d.execute(
                "SELECT seq, topic, data, published_at, actor FROM events "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                [seq, upto, limit],
            ).fetchall()
            return [(s, t, data.encode(), at, by) for s, t, data, at, by in rows]

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
            conn.execute(
                "DELETE FROM process_signals WHERE process IN "
                "(SELECT id FROM processes WHERE finished_at < ?)",
                [before],
            )
            conn.execute("DELETE FROM processes WHERE finished_at < ?", [before])
            conn.execute("DELETE FROM events WHERE published_at < ?", [events_before])
            return {(w, ProcessStatus(s)): n for w, s, n in gone}

        return await self._db.write(write)
