"""The audit trail in the daemon's SQLite file."""

from __future__ import annotations

from collections.abc import Sequence

import sqlite_utils

from monitor.audit.abc import AuditQuery, AuditRecord
from monitor.audit.stores import sql
from monitor.storage.riders import Rider
from registry.stores.sqlite import Transactor

_INSERT = sql.insert("?")


class _Rider:
    __slots__ = ("record",)

    def __init__(self, record: AuditRecord) -> None:
        self.record = record

    def write(self, conn: sqlite_utils.Database) -> None:
        cursor = conn.conn.execute(_INSERT, sql.values(self.record))
        self.record.id = cursor.lastrowid

    def write_all(self, conn: sqlite_utils.Database, riders: Sequence[Rider]) -> None:
        for rider in riders:  # SQLite has no round trips to save
            rider.write(conn)


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
