"""The audit trail in PostgreSQL: one table, so every replica's records are one trail."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.audit.abc import AuditQuery, AuditRecord
from monitor.audit.stores import sql
from monitor.storage.riders import Ordered, Rider
from registry.stores.pg import Connection, PgTransactor

MIGRATIONS = tuple(sql.create("id BIGSERIAL PRIMARY KEY"))
_TYPES = ("float8", "text", "text", "text", "int4", "text", "text", "int4")  # sql.COLUMNS'
_CONVERT = tuple({"float8": float, "text": str, "int4": int}[kind] for kind in _TYPES)
_INSERT = (
    f"INSERT INTO {sql.TABLE} ({', '.join(sql.COLUMNS)}) SELECT * FROM unnest("  # noqa: S608
    + ", ".join(f"%s::{kind}[]" for kind in _TYPES)
    + ") RETURNING id"
)


class _Rider:
    __slots__ = ("record",)
    lock = sql.TABLE  # ids in commit order (riders.Ordered): a cursor never passes one

    def __init__(self, record: AuditRecord) -> None:
        self.record = record

    def write(self, conn: Connection) -> None:
        self.write_all(conn, [self])

    def write_all(self, conn: Connection, riders: Sequence[Rider]) -> None:
        """The batch's records in one statement of one text, whatever their number (a
        column an array, `_INSERT`): psycopg prepares it once, where a VALUES row per record
        made a text per batch size, parsed for its placeholders in Python each batch
        (psycopg caches no statement of over 50 parameters). Rows are inserted, and take
        their ids from the sequence, in the arrays' order: the ids returned, sorted, are
        the records' in that order."""
        records = [rider.record for rider in riders if isinstance(rider, _Rider)]
        if not records:
            return
        # Each column of one Python type, as psycopg dumps an array (an int among floats
        # would fail the batch): converted as the column's type says.
        by_column = zip(_CONVERT, zip(*map(sql.values, records), strict=True), strict=True)
        columns = [[convert(value) for value in column] for convert, column in by_column]
        # The batch took the trail's lock first (locks()): no other batch's ids interleave.
        rows = conn.execute(_INSERT, columns).fetchall()
        for record, taken in zip(records, sorted(int(row[0]) for row in rows), strict=True):
            record.id = taken


class PgAuditStore:
    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def open(self) -> None:
        await self._db.migrate("audit", MIGRATIONS)

    def rider(self, record: AuditRecord) -> _Rider:
        return _Rider(record)

    async def add(self, record: AuditRecord) -> None:
        await self._db.write(Ordered(_Rider(record).write, sql.TABLE), ride=False)

    async def add_refusals(self, records: list[AuditRecord], minute: int) -> None:
        writer = sql.refusals_writer("%s", records, minute)
        await self._db.write(Ordered(writer, sql.TABLE), ride=False)

    async def list(self, query: AuditQuery) -> list[AuditRecord]:
        return await self._db.read(sql.reader("%s", query))

    async def prune(self, before: float) -> int:
        return await self._db.write(sql.pruner("%s", before))
