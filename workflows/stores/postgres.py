"""Processes, their history, signals, published events and definitions in the cluster's
PostgreSQL: the twin of workflows/stores/sqlite.py (same tables, same behaviour), for
several replicas on one database.

A checkpoint is the engine's hot path: the row, the signals it took and its history rows
are one statement (one round trip to the server), inside the writer's group commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from registry.stores.pg import Connection, PgTransactor
from workflows.abc import ScheduleMark, TaskRecord
from workflows.records import (
    Attempt,
    NewEvent,
    Process,
    Signal,
    Staged,
    StoredDefinition,
    StoredEvent,
    branches_json,
)
from workflows.states import ProcessStatus

from .postgres_schedules import write_mark
from .postgres_tasks import cancel_open_in, open_in, write_end
from .sqlite import _HISTORY, _attempt, _process, fenced, keys_of

__all__ = ["MIGRATIONS", "PgWorkflowStore"]

MIGRATIONS = (
    """CREATE TABLE processes (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        input TEXT NOT NULL,
        outputs TEXT NOT NULL,
        idempotency_key TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        deadline_at DOUBLE PRECISION,
        deadline_missed BOOLEAN NOT NULL DEFAULT false,
        position BIGINT NOT NULL DEFAULT 0,
        attempt BIGINT NOT NULL DEFAULT 0,
        wake_at DOUBLE PRECISION,
        wait_seq BIGINT,
        compensating_from BIGINT,
        cancel_requested BOOLEAN NOT NULL DEFAULT false,
        error TEXT,
        output TEXT,
        workflow_version BIGINT NOT NULL DEFAULT 1,
        branches TEXT,
        UNIQUE (workflow, idempotency_key)
    )""",
    "CREATE INDEX processes_open ON processes (status) WHERE finished_at IS NULL",
    "CREATE INDEX processes_workflow ON processes (workflow, seq)",
    "CREATE INDEX processes_status ON processes (status, seq)",
    "CREATE INDEX processes_finished ON processes (finished_at)",
    """CREATE TABLE process_history (
        process BIGINT NOT NULL,
        n BIGINT NOT NULL,
        step TEXT NOT NULL,
        kind TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT,
        instance TEXT,
        http_status INTEGER,
        PRIMARY KEY (process, n)
    )""",
    """CREATE TABLE events (
        seq BIGINT PRIMARY KEY,
        topic TEXT NOT NULL,
        data TEXT NOT NULL,
        key TEXT UNIQUE,
        published_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX events_topic ON events (topic, seq)",
    "CREATE INDEX events_published ON events (published_at)",
    # The highest event id ever stored, pruned or not (SQLite's sqlite_sequence): ids are
    # never given twice and a client's Last-Event-ID keeps its meaning.
    "CREATE TABLE event_ids (last BIGINT NOT NULL)",
    "INSERT INTO event_ids VALUES (0)",
    """CREATE TABLE workflow_definitions (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        source TEXT NOT NULL,
        spec TEXT NOT NULL,
        defined_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE process_signals (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        process TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        sent_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX process_signals_process ON process_signals (process, seq)",
    # The member key running the process (Process.owner): checkpoints are fenced by it.
    "ALTER TABLE processes ADD COLUMN owner TEXT",
    "CREATE INDEX processes_owner ON processes (owner, seq) WHERE finished_at IS NULL",
    # Residency (Process.due_at, the event it waits for). Processes stored before would
    # never be due (the engine loads by due_at): due at their last checkpoint, so the next
    # open loads each and its checkpoint sets it.
    "ALTER TABLE processes ADD COLUMN due_at DOUBLE PRECISION, ADD COLUMN wait_topic TEXT, "
    "ADD COLUMN wait_keys TEXT, ADD COLUMN wait_match TEXT",
    "UPDATE processes SET due_at = updated_at WHERE finished_at IS NULL",
    "CREATE INDEX processes_due ON processes (due_at, seq) "
    "WHERE finished_at IS NULL AND due_at IS NOT NULL",
    "CREATE INDEX processes_waiting ON processes (wait_topic, wait_keys, wait_match) "
    "WHERE finished_at IS NULL AND wait_topic IS NOT NULL",
    # Who started, cancelled, signalled a process, who published an event (issue 18):
    # names, never tokens; NULL on rows stored before.
    "ALTER TABLE processes ADD COLUMN started_by TEXT, ADD COLUMN cancelled_by TEXT",
    "ALTER TABLE process_history ADD COLUMN signalled_by TEXT",
    "ALTER TABLE process_signals ADD COLUMN sent_by TEXT",
    "ALTER TABLE events ADD COLUMN actor TEXT",
)

# What a checkpoint writes; `owner` is written by create and claim_orphans only.
_STATE = (
    "id, workflow, status, input, outputs, idempotency_key, created_at, updated_at, "
    "finished_at, deadline_at, deadline_missed, position, attempt, wake_at, wait_seq, "
    "compensating_from, cancel_requested, error, output, workflow_version, branches, "
    "due_at, wait_topic, wait_keys, wait_match, started_by, cancelled_by"
)
_COLUMNS = f"{_STATE}, owner"
_MARKS = ", ".join(["%s"] * len(_COLUMNS.split(",")))
_NAMED = ", ".join(f"%(c{i})s" for i in range(len(_STATE.split(","))))
# Built from the constants above only (no input reaches these strings).
_SELECT = f"SELECT seq, {_COLUMNS}"
_INSERT = f"INSERT INTO processes ({_COLUMNS}) VALUES ({_MARKS})"  # noqa: S608
# A second start with the same key (another replica's, a publish run again) inserts
# nothing and reads the stored process instead.
_INSERT_KEYED = f"{_INSERT} ON CONFLICT (workflow, idempotency_key) DO NOTHING RETURNING seq"
_INSERT_NEW = f"{_INSERT} RETURNING seq"
_HISTORY_COUNT = "(SELECT count(*) FROM process_history h WHERE h.process = processes.seq)"
_SELECT_OPEN = f"{_SELECT}, {_HISTORY_COUNT} FROM processes WHERE finished_at IS NULL ORDER BY seq"
# A checkpoint in one statement (one round trip): the row, the signals it took, and its
# history rows as arrays. A row's number is given from memory (a single line), or, when
# NULL (a process with branches: its checkpoints race), follows those stored. Fenced: the
# row is written only while it names the checkpoint's owner (a claimer's UPDATE waits for
# or is rechecked against ours), and the rest only with it; it answers whether it was.
_CHECKPOINT = (
    "WITH updated AS ("  # noqa: S608 - built from the constants above only
    f"  UPDATE processes SET ({_STATE}) = ({_NAMED}) "
    "  WHERE seq = %(seq)s AND owner IS NOT DISTINCT FROM %(owner)s RETURNING seq"
    "), taken AS ("
    "  DELETE FROM process_signals WHERE seq = ANY(%(taken)s::bigint[])"
    "  AND EXISTS (SELECT 1 FROM updated)"
    "), history AS (INSERT INTO process_history "
    "SELECT %(seq)s, coalesce(%(first)s::bigint, (SELECT coalesce(max(n) + 1, 0) "
    "  FROM process_history WHERE process = %(seq)s)) + h.i - 1, h.step, h.kind, h.attempt,"
    "  h.started_at, h.ended_at, h.outcome, h.error, h.instance, h.http_status, "
    "  h.signalled_by "
    "FROM unnest(%(step)s::text[], %(kind)s::text[], %(attempt)s::bigint[],"
    "  %(started_at)s::float8[], %(ended_at)s::float8[], %(outcome)s::text[],"
    "  %(error)s::text[], %(instance)s::text[], %(http_status)s::int[],"
    "  %(signalled_by)s::text[]) WITH ORDINALITY"
    "  AS h (step, kind, attempt, started_at, ended_at, outcome, error, instance,"
    "  http_status, signalled_by, i) WHERE EXISTS (SELECT 1 FROM updated)"
    ") SELECT EXISTS (SELECT 1 FROM updated)"
)
# Orphans taken oldest first; one a replica is checkpointing (its row locked) is skipped,
# not waited for: the next sweep takes it, and that replica's next checkpoint is fenced.
_CLAIM = (
    "UPDATE processes SET owner = %s WHERE seq IN (SELECT seq FROM processes "  # noqa: S608
    "WHERE finished_at IS NULL AND owner = ANY(%s) ORDER BY seq LIMIT %s "
    f"FOR UPDATE SKIP LOCKED) RETURNING seq, {_COLUMNS}, {_HISTORY_COUNT}"
)
# An UPDATE waits for the row lock of a checkpoint of the old owner in flight and then
# looks at the row again (a process that checkpoint finished is not taken); every later
# checkpoint of the old owner is fenced.
_TAKE_OVER = (
    "UPDATE processes SET owner = %s WHERE finished_at IS NULL AND owner IS DISTINCT FROM %s "
    "AND (due_at <= %s OR (due_at IS NULL AND updated_at >= %s))"
)
# A read that makes its rows the reader's: RETURNING gives each row as it is once any
# checkpoint under way on it has committed (the UPDATE waits for its lock).
_CLAIM_DUE = (
    "UPDATE processes SET owner = %s WHERE seq IN (SELECT seq FROM processes "  # noqa: S608
    "WHERE finished_at IS NULL AND due_at IS NOT NULL AND due_at <= %s {after} "
    f"ORDER BY due_at, seq LIMIT %s) RETURNING seq, {_COLUMNS}, {_HISTORY_COUNT}"
)
_CLAIM_OF = (
    "UPDATE processes SET owner = %s WHERE id = ANY(%s) AND finished_at IS NULL "  # noqa: S608
    f"RETURNING seq, {_COLUMNS}, {_HISTORY_COUNT}"
)
# The terms of processes_due's WHERE are spelled out so its use needs no inference.
_DUE = (
    f"{_SELECT}, {_HISTORY_COUNT} FROM processes "
    "WHERE finished_at IS NULL AND due_at IS NOT NULL AND due_at <= %s {after} "
    "ORDER BY due_at, seq LIMIT %s"
)
_UNFINISHED_OF = (
    f"{_SELECT}, {_HISTORY_COUNT} FROM processes "
    "WHERE id = ANY(%s) AND finished_at IS NULL ORDER BY seq"
)
_WAITING_KEYS = (
    "SELECT DISTINCT wait_topic, wait_keys FROM processes "
    "WHERE finished_at IS NULL AND wait_topic IS NOT NULL"
)
_WAITERS = (
    "SELECT id FROM processes WHERE finished_at IS NULL AND wait_topic IS NOT NULL "
    "AND wait_topic = %s AND wait_keys = %s AND wait_match = %s LIMIT %s"
)
# Each stored event's id, at its COMMIT: every replica's relay reads it (monitor/relay.py).
EVENTS_CHANNEL = "hms_events"
# One statement, in the pipeline: the event (once per key), the high-water mark of event
# ids, and the NOTIFY of its id (sent at COMMIT; none for a duplicate key).
_EVENT = (
    "WITH stored AS (INSERT INTO events (seq, topic, data, key, published_at, actor) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING RETURNING seq), "
    "marked AS (UPDATE event_ids SET last = greatest(last, (SELECT seq FROM stored)) "
    "WHERE EXISTS (SELECT 1 FROM stored)) "
    "SELECT seq, pg_notify(%s, seq::text) FROM stored"
)
# An event or a signal makes the processes it may end a wait of due now (never later).
_WAKE_WAITERS = (
    "UPDATE processes SET due_at = %s WHERE finished_at IS NULL AND wait_topic = %s "
    "AND wait_keys = %s AND wait_match = %s AND (due_at IS NULL OR due_at > %s)"
)
_WAKE_SIGNALLED = (
    "UPDATE processes SET due_at = %s WHERE id = %s AND finished_at IS NULL "
    "AND (due_at IS NULL OR due_at > %s)"
)
_HISTORY_OF_OLD = (
    "DELETE FROM process_history WHERE process IN "
    "(SELECT seq FROM processes WHERE finished_at < %s)"
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
        process.deadline_missed,
        process.position,
        process.attempt,
        process.wake_at,
        process.wait_seq,
        process.compensating_from,
        process.cancel_requested,
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
        process.owner,
    )


def _checkpoint_args(
    row: tuple[Any, ...],
    seq: int,
    first: int | None,
    taken: tuple[int, ...],
    history: list[Attempt],
) -> dict[str, Any]:
    """The arguments of `_CHECKPOINT`: the row's columns (the owner fences), then the
    history by column."""
    args: dict[str, Any] = {f"c{i}": value for i, value in enumerate(row[:-1])}
    args.update(seq=seq, first=first, taken=list(taken), owner=row[-1])
    for column in (
        "step", "kind", "attempt", "started_at", "ended_at", "outcome", "error", "instance",
        "http_status", "signalled_by",
    ):  # fmt: skip
        args[column] = [getattr(a, column) for a in history]
    return args


class PgWorkflowStore:
    """Processes, history, signals, events and definitions on PostgreSQL: a
    `WorkflowStore` (workflows/abc.py), so a publish and the processes it starts commit
    together, as on SQLite."""

    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("workflows", MIGRATIONS)

    async def create(
        self,
        processes: list[Process],
        event: NewEvent | None,
        *,
        schedule: ScheduleMark | None = None,
    ) -> tuple[list[tuple[Process, bool]], int | None]:
        """Insert new processes (and the event that started them) in one transaction, in
        one round trip: a process whose (workflow, idempotency_key) exists is not inserted
        and the stored one comes back, marked not new; an event whose key exists is not
        stored twice; a schedule's mark moves with its tick's process."""

        def write(conn: Connection) -> tuple[list[tuple[Process, bool]], int | None]:
            with conn.pipeline():
                stored = None
                if event is not None:
                    data = event.data.decode()
                    at = event.published_at
                    args = (event.seq, event.topic, data, event.key, at, event.actor)
                    stored = conn.execute(_EVENT, (*args, EVENTS_CHANNEL))
                inserted = [
                    conn.execute(
                        _INSERT_NEW if p.idempotency_key is None else _INSERT_KEYED, _row(p)
                    )
                    for p in processes
                ]
                if schedule is not None:
                    write_mark(conn, schedule)
                seq = None if stored is None or (row := stored.fetchone()) is None else row[0]
                out = []
                for process, cursor in zip(processes, inserted, strict=True):
                    new = cursor.fetchone()
                    if new is not None:
                        process.seq = int(new[0])
                        out.append((process, True))
                        continue
                    again = conn.execute(
                        _SELECT + ", 0 FROM processes WHERE workflow = %s AND idempotency_key = %s",
                        (process.workflow, process.idempotency_key),
                    ).fetchone()
                    assert again is not None  # the conflicting row, in this transaction's view
                    out.append((_process(again), False))
            if seq is not None and event is not None:  # its waiters are due now, even after a crash
                for match in event.wakes:
                    at = event.published_at
                    conn.execute(_WAKE_WAITERS, (at, event.topic, keys_of(match), match, at))
            return out, seq

        return await self._db.write(write)

    async def checkpoint(self, process: Process) -> None:
        """The row and the history gathered since the last checkpoint, atomically, in one
        statement (one round trip unless a task is answered or opened with it).

        As on SQLite (SqliteWorkflowStore.checkpoint): a refused write puts the history, the
        taken signals and the task answers back for the retry; a process with branches has
        its rows numbered inside the write, after those stored."""
        staged = Staged.take(process)
        history, taken, ends, opening = staged.history, staged.taken, staged.ends, staged.opening
        first = staged.first
        row, seq = _row(process), process.seq
        finished = process.finished_at if process.has_tasks else None
        args = _checkpoint_args(row, seq, first, taken, history)

        def write(conn: Connection) -> tuple[TaskRecord, bool] | None:
            written = conn.execute(_CHECKPOINT, args).fetchone()
            if written is None or not written[0]:
                raise fenced(process)
            for end in ends:  # the workers' answers that ended the steps, in their commit
                write_end(conn, end)
            if finished is not None:  # no task of a finished process stays open
                cancel_open_in(conn, process.id, finished)
            if opening is None:
                return None
            return open_in(conn, opening.task, opening.claim_for, opening.now)

        try:
            opened = await self._db.write(write)
        except BaseException:
            staged.put_back(process)
            raise
        staged.written(process, opened)

    async def claim_orphans(
        self, owner: str, dead_owners: Sequence[str], limit: int
    ) -> list[Process]:
        """Take over the unfinished processes of dead owners, oldest first: one statement,
        `FOR UPDATE SKIP LOCKED`, so claimers at once take disjoint sets and never wait on
        a row being checkpointed."""

        def write(conn: Connection) -> list[Process]:
            rows = conn.execute(_CLAIM, (owner, list(dead_owners), limit)).fetchall()
            return sorted((_process(r) for r in rows), key=lambda p: p.seq)

        return await self._db.write(write)

    async def take_over(self, owner: str, due_before: float, updated_after: float) -> int:
        def write(conn: Connection) -> int:
            args = (owner, owner, due_before, updated_after)
            return conn.execute(_TAKE_OVER, args).rowcount

        return await self._db.write(write)

    async def due(
        self,
        after: tuple[float, int] | None,
        before: float,
        limit: int,
        owner: str | None = None,
    ) -> list[Process]:
        cursor = "" if after is None else "AND (due_at, seq) > (%s, %s)"
        args = (before, *(after or ()), limit)
        if owner is not None:

            def claim(conn: Connection) -> list[Process]:
                query = _CLAIM_DUE.format(after=cursor)
                rows = [_process(r) for r in conn.execute(query, (owner, *args)).fetchall()]
                return sorted(rows, key=lambda p: (p.due_at or 0.0, p.seq))

            return await self._db.write(claim, ride=False)  # a claim is not a change

        def read(conn: Connection) -> list[Process]:
            return [_process(r) for r in conn.execute(_DUE.format(after=cursor), args).fetchall()]

        return await self._db.read(read)

    async def unfinished_of(self, ids: Sequence[str], owner: str | None = None) -> list[Process]:
        if owner is not None:

            def claim(conn: Connection) -> list[Process]:
                rows = conn.execute(_CLAIM_OF, (owner, list(ids))).fetchall()
                return sorted((_process(r) for r in rows), key=lambda p: p.seq)

            return await self._db.write(claim, ride=False)  # a claim is not a change

        def read(conn: Connection) -> list[Process]:
            return [_process(r) for r in conn.execute(_UNFINISHED_OF, [list(ids)]).fetchall()]

        return await self._db.read(read)

    async def unfinished_of_version(self, workflow: str, version: int) -> list[str]:
        def read(conn: Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM processes WHERE finished_at IS NULL AND workflow = %s "
                "AND workflow_version = %s ORDER BY seq",
                (workflow, version),
            ).fetchall()
            return [id_ for (id_,) in rows]

        return await self._db.read(read)

    async def waiting_keys(self) -> list[tuple[str, str]]:
        def read(conn: Connection) -> list[tuple[str, str]]:
            return [(topic, keys) for topic, keys in conn.execute(_WAITING_KEYS).fetchall()]

        return await self._db.read(read)

    async def waiters(self, topic: str, match: str, limit: int) -> list[str]:
        args = (topic, keys_of(match), match, limit)

        def read(conn: Connection) -> list[str]:
            return [id_ for (id_,) in conn.execute(_WAITERS, args).fetchall()]

        return await self._db.read(read)

    async def definitions(self) -> list[StoredDefinition]:
        def read(conn: Connection) -> list[StoredDefinition]:
            rows = conn.execute(
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
        highest stored version of its name. Replicas deploying the same name at once queue
        on a lock of the name, so they never pick the same number."""

        def write(conn: Connection) -> list[int]:
            versions = []
            for definition in definitions:
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('workflow_definitions'), hashtext(%s))",
                    [definition.name],
                )
                row = conn.execute(
                    "INSERT INTO workflow_definitions SELECT %s, coalesce(max(version), 0) + 1, "
                    "%s, %s, %s FROM workflow_definitions WHERE name = %s RETURNING version",
                    (
                        definition.name,
                        definition.source,
                        orjson.dumps(definition.spec).decode(),
                        definition.defined_at,
                        definition.name,
                    ),
                ).fetchone()
                assert row is not None  # RETURNING of an INSERT
                versions.append(int(row[0]))
            return versions

        return await self._db.write(write)

    async def add_signal(
        self, process_id: str, name: str, data: bytes, at: float, by: str | None = None
    ) -> Signal:
        def write(conn: Connection) -> int:
            row = conn.execute(
                "INSERT INTO process_signals (process, name, data, sent_at, sent_by) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING seq",
                (process_id, name, data.decode(), at, by),
            ).fetchone()
            assert row is not None  # RETURNING of an INSERT
            conn.execute(_WAKE_SIGNALLED, (at, process_id, at))  # due now, even after a crash
            return int(row[0])

        seq = await self._db.write(write)
        return Signal(
            seq=seq, process=process_id, name=name, data=orjson.loads(data), sent_at=at, by=by
        )

    async def pending_signals(self) -> list[Signal]:
        """Signals not yet taken by unfinished processes, oldest first."""

        def read(conn: Connection) -> list[Signal]:
            rows = conn.execute(
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
        def read(conn: Connection) -> list[Process]:
            return [_process(r) for r in conn.execute(_SELECT_OPEN).fetchall()]

        return await self._db.read(read)

    async def by_key(self, workflow: str, idempotency_key: str) -> Process | None:
        def read(conn: Connection) -> Process | None:
            query = _SELECT + ", 0 FROM processes WHERE workflow = %s AND idempotency_key = %s"
            row = conn.execute(query, [workflow, idempotency_key]).fetchone()
            return None if row is None else _process(row)

        return await self._db.read(read)

    async def get(self, process_id: str) -> tuple[Process, list[Attempt]] | None:
        def read(conn: Connection) -> tuple[Process, list[Attempt]] | None:
            row = conn.execute(
                _SELECT + ", 0 FROM processes WHERE id = %s", [process_id]
            ).fetchone()
            if row is None:
                return None
            history = conn.execute(
                f"SELECT {_HISTORY} FROM process_history WHERE process = %s ORDER BY n",  # noqa: S608
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
                where.append(f"{column} = %s")
                args.append(value)
        if before is not None:
            where.append("seq < %s")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""

        def read(conn: Connection) -> list[Process]:
            rows = conn.execute(
                _SELECT + f", 0 FROM processes {clause} ORDER BY seq DESC LIMIT %s",
                [*args, limit],
            ).fetchall()
            return [_process(r) for r in rows]

        return await self._db.read(read)

    async def counts(self) -> dict[tuple[str, ProcessStatus], int]:
        def read(conn: Connection) -> dict[tuple[str, ProcessStatus], int]:
            rows = conn.execute(
                "SELECT workflow, status, count(*) FROM processes GROUP BY workflow, status"
            ).fetchall()
            return {(w, ProcessStatus(s)): n for w, s, n in rows}

        return await self._db.read(read)

    async def events_since(self, topic: str, seq: int) -> list[StoredEvent]:
        def read(conn: Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, topic, data, published_at, actor FROM events "
                "WHERE topic = %s AND seq > %s ORDER BY seq",
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

        def read(conn: Connection) -> list[tuple[int, str, bytes, float, str | None]]:
            rows = conn.execute(
                "SELECT seq, topic, data, published_at, actor FROM events "
                "WHERE seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
                [seq, upto, limit],
            ).fetchall()
            return [(s, t, data.encode(), at, by) for s, t, data, at, by in rows]

        return await self._db.read(read)

    async def last_event_seq(self) -> int:
        """The highest event id ever stored, pruned or not (`event_ids` remembers it)."""

        def read(conn: Connection) -> int:
            row = conn.execute("SELECT last FROM event_ids").fetchone()
            return int(row[0]) if row is not None else 0

        return await self._db.read(read)

    async def outcomes(self, workflow: str, since: float) -> list[tuple[int, int, int]]:
        """(minute, good, valid) per minute for the workflow SLO: a process counts once,
        bad at its missed deadline, else at its end (good when completed)."""

        def read(conn: Connection) -> list[tuple[int, int, int]]:
            rows = conn.execute(
                "SELECT floor(at / 60)::bigint AS minute, sum(good::int), count(*) FROM ("
                "  SELECT CASE WHEN deadline_missed THEN deadline_at ELSE finished_at END AS at,"
                "         (status = 'completed' AND NOT deadline_missed) AS good"
                "  FROM processes"
                "  WHERE workflow = %s AND (deadline_missed OR finished_at IS NOT NULL)"
                ") AS ended WHERE at >= %s GROUP BY minute ORDER BY minute",
                [workflow, since],
            ).fetchall()
            return [(int(m), int(g), int(n)) for m, g, n in rows]

        return await self._db.read(read)

    async def prune(
        self, before: float, events_before: float
    ) -> dict[tuple[str, ProcessStatus], int]:
        """Forget processes finished before `before` and events published before
        `events_before`; what went."""

        def write(conn: Connection) -> dict[tuple[str, ProcessStatus], int]:
            gone = conn.execute(
                "SELECT workflow, status, count(*) FROM processes WHERE finished_at < %s "
                "GROUP BY workflow, status",
                [before],
            ).fetchall()
            with conn.pipeline():
                conn.execute(_HISTORY_OF_OLD, [before])
                conn.execute(
                    "DELETE FROM process_signals WHERE process IN "
                    "(SELECT id FROM processes WHERE finished_at < %s)",
                    [before],
                )
                conn.execute("DELETE FROM processes WHERE finished_at < %s", [before])
                conn.execute("DELETE FROM events WHERE published_at < %s", [events_before])
            return {(w, ProcessStatus(s)): n for w, s, n in gone}

        return await self._db.write(write)
