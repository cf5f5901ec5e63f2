"""The audit trail in the daemon's SQLite file."""

from __future__ import annotations

from collections.abc import Sequence

import sqlite_utils

from monitor.audit.abc import AuditQuery, AuditRecord
from monitor.audit.stores import sql
from monitor.storage.riders import Rider
from registry.stores.sqlite import Transactor


class _Rider:
    __slots__ = ("record",)

    def __init__(self, record: AuditRecord) -> None:
        self.record = record

    def write(self, conn: sqlite_utils.Database) -> None:
        self.write_all(conn, [self])

    def write_all(self, conn: sqlite_utils.Database, riders: Sequence[Rider]) -> None:
        """A batch's records in one statement (each statement the database's thread runs
        takes the GIL back from the event loop once more). Ids: one writer, one statement,
        AUTOINCREMENT: its rows take consecutive ids in VALUES' order, the last one's is
        `lastrowid`."""
        records = [rider.record for rider in riders if isinstance(rider, _Rider)]
        for chunk in sql.chunks(records):
            last = conn.conn.execute(sql.insert("?", len(chunk)), sql.flat_values(chunk)).lastrowid
            first = int(last or 0) - len(chunk) + 1
            for offset, record in enumerate(chunk):
                record.id = first + offset


class SqliteAuditStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def open(self) -> None:
        def create(db: sqlite_utils.Database) -> None:
            for statement in sql.create("id INTEGER PRIMARY KEY AUTOINCREMENT"):
                db.execute(statement)

        await self._db.write(create)

    def rider(self, record: AuditRecord) -> _Rider:
        return _Rider(record)

    async def add(self, record: AuditRecord) -> None:
        await self._db.write(_Rider(record).write, ride=False)

    async def add_refusals(self, records: list[AuditRecord], minute: int) -> None:
        await self._db.write(sql.refusals_writer("?", records, minute), ride=False)

    async def list(self, query: AuditQuery) -> list[AuditRecord]:
        return await self._db.read(sql.reader("?", query))

    async def prune(self, before: float) -> int:
        return await self._db.write(sql.pruner("?", before))
