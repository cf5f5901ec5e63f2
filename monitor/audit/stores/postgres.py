"""The audit trail in PostgreSQL: one table, so every replica's records are one trail."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.audit.abc import AuditQuery, AuditRecord
from monitor.audit.stores import sql
from monitor.storage.riders import Ordered, Rider
from registry.stores.pg import Connection, PgTransactor

MIGRATIONS = tuple(sql.create("id BIGSERIAL PRIMARY KEY"))
_RETURNING = " RETURNING id"


class _Rider:
    __slots__ = ("record",)
    lock = sql.TABLE  # ids in commit order (riders.Ordered): a cursor never passes one

    def __init__(self, record: AuditRecord) -> None:
        self.record = record

    def write(self, conn: Connection) -> None:
        self.write_all(conn, [self])

    def write_all(self, conn: Connection, riders: Sequence[Rider]) -> None:
        """The batch's records in one statement per ROWS_PER_INSERT (the database's thread
        holds the GIL for each statement's parameters and results, so fewer is cheaper for
        the event loop too). The sequence hands its values out as VALUES' rows are inserted,
        in order: the ids returned, sorted, are the rows' in that order."""
        records = [rider.record for rider in riders if isinstance(rider, _Rider)]
        with conn.cursor() as cursor:  # the batch took the trail's lock first (locks())
            for chunk in sql.chunks(records):
                # Not prepared: a text per batch size would churn psycopg's prepared cache.
                query = sql.insert("%s", len(chunk)) + _RETURNING
                cursor.execute(query, sql.flat_values(chunk), prepare=False)
                ids = sorted(int(row[0]) for row in cursor.fetchall())
                for record, taken in zip(chunk, ids, strict=True):
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
