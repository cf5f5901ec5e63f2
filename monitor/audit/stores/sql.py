"""The audit table's statements, the same on SQLite and PostgreSQL but for placeholders
(`?` and `%s`) and the id column."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from monitor.audit.abc import AuditQuery, AuditRecord

TABLE = "audit_records"
COLUMNS = ("time", "actor", "action", "target", "outcome", "request_id", "client", "count")


def create(id_column: str) -> list[str]:
    """`minute` is set on refusals only: the unique index, partial, keeps one row per
    actor, action and minute, and costs the other records (every change) nothing."""
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE} ({id_column}, time DOUBLE PRECISION NOT NULL, "
        "actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, "
        "outcome INTEGER NOT NULL, request_id TEXT NOT NULL, client TEXT NOT NULL, "
        "count INTEGER NOT NULL DEFAULT 1, minute BIGINT)",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time)",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_refusals ON {TABLE} (actor, action, minute) "
        "WHERE minute IS NOT NULL",
    ]


# Records per INSERT at most: a power of two within the 999 bound parameters an older
# SQLite allows.
ROWS_PER_INSERT = 1 << ((999 // len(COLUMNS)).bit_length() - 1)


def chunks(records: list[AuditRecord]) -> Iterator[list[AuditRecord]]:
    """`records` a statement at a time, each of a power of two records (the largest
    that fits, up to ROWS_PER_INSERT): a statement's text is kept prepared by its
    connection, one per distinct text (128 at most), and an INSERT of every count a
    batch happens to have held 2 MB of SQLite's memory at 10,000 instances; these are
    seven texts."""
    start = 0
    while start < len(records):
        size = min(ROWS_PER_INSERT, 1 << ((len(records) - start).bit_length() - 1))
        yield records[start : start + size]
        start += size


def flat_values(records: list[AuditRecord]) -> list[Any]:
    """The parameters of `insert(mark, len(records))`."""
    return [value for record in records for value in values(record)]


def insert(mark: str, rows: int = 1) -> str:
    """An INSERT of `rows` records (in VALUES' order)."""
    row = "(" + ", ".join([mark] * len(COLUMNS)) + ")"
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES {', '.join([row] * rows)}"  # noqa: S608


def insert_refusal(mark: str) -> str:
    marks = ", ".join([mark] * (len(COLUMNS) + 1))
    return (
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}, minute) VALUES ({marks}) "  # noqa: S608
        "ON CONFLICT (actor, action, minute) WHERE minute IS NOT NULL DO UPDATE SET count = "
        f"{TABLE}.count + excluded.count RETURNING id"
    )


def values(r: AuditRecord) -> tuple[Any, ...]:
    """In COLUMNS' order."""
    return (r.time, r.actor, r.action, r.target, r.outcome, r.request_id, r.client, r.count)


def select(query: AuditQuery, mark: str) -> tuple[str, list[Any]]:
    where, params = ["id > " + mark], list[Any]([query.after])
    if query.since is not None:
        where.append("time >= " + mark)
        params.append(query.since)
    if query.until is not None:
        where.append("time < " + mark)
        params.append(query.until)
    for column in ("actor", "action", "target"):
        wanted = getattr(query, column)
        if wanted is None:
            continue
        if wanted.endswith("*"):  # a prefix: compared as a range, no LIKE escaping to get wrong
            prefix = wanted[:-1]
            where.append(f"substr({column}, 1, {len(prefix)}) = {mark}")
            params.append(prefix)
        else:
            where.append(f"{column} = {mark}")
            params.append(wanted)
    sql = (
        f"SELECT id, {', '.join(COLUMNS)} FROM {TABLE} WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY id{' DESC' if query.newest else ''} LIMIT {int(query.limit)}"
    )
    return sql, params


def record(row: Any) -> AuditRecord:
    id_, time, actor, action, target, outcome, request_id, client, count = row
    return AuditRecord(
        id=int(id_),
        time=float(time),
        actor=actor,
        action=action,
        target=target,
        outcome=int(outcome),
        request_id=request_id,
        client=client,
        count=int(count),
    )


def prune(mark: str) -> str:
    return f"DELETE FROM {TABLE} WHERE time < {mark}"  # noqa: S608


# What each store hands its database (both connections take `execute(sql, params)`).


def refusals_writer(mark: str, records: list[AuditRecord], minute: int) -> Callable[[Any], None]:
    statement = insert_refusal(mark)

    def add(conn: Any) -> None:
        for record in sorted(records, key=lambda r: r.actor):  # one lock order: no deadlock
            # The minute's row, new or counted on: its id is the one `audit.recorded` carries.
            record.id = int(conn.execute(statement, [*values(record), minute]).fetchone()[0])

    return add


def reader(mark: str, query: AuditQuery) -> Callable[[Any], list[AuditRecord]]:
    statement, params = select(query, mark)

    def read(conn: Any) -> list[AuditRecord]:
        return [record(row) for row in conn.execute(statement, params).fetchall()]

    return read


def pruner(mark: str, before: float) -> Callable[[Any], int]:
    statement = prune(mark)

    def delete(conn: Any) -> int:
        return int(conn.execute(statement, [before]).rowcount)

    return delete
