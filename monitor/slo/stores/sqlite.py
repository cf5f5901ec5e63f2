"""SloMinuteStore on the daemon's SQLite database (the slo_minutes table)."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from registry import Transactor

_UPSERT = (
    "INSERT INTO slo_minutes (service, slo, minute, good, valid) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(service, slo, minute) DO UPDATE SET "
    "good = good + excluded.good, valid = valid + excluded.valid"
)


class SqliteSloMinuteStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.write(_create_table)

    async def minutes(self, service: str, slo: str, since: int) -> list[tuple[int, int, int]]:
        def read(db: sqlite_utils.Database) -> list[Any]:
            cursor = db.execute(
                "SELECT minute, good, valid FROM slo_minutes "
                "WHERE service = ? AND slo = ? AND minute >= ?",
                [service, slo, since],
            )
            return cursor.fetchall()

        rows: list[tuple[int, int, int]] = await self._db.read(read)
        return rows

    async def add(self, rows: list[tuple[str, str, int, int, int]]) -> None:
        def write(db: sqlite_utils.Database) -> None:
            db.conn.executemany(_UPSERT, rows)

        await self._db.write(write)

    async def prune(self, before_minute: int) -> None:
        def prune(db: sqlite_utils.Database) -> None:
            db.execute("DELETE FROM slo_minutes WHERE minute < ?", [before_minute])

        await self._db.write(prune)


def _create_table(db: sqlite_utils.Database) -> None:
    if not db["slo_minutes"].exists():
        db["slo_minutes"].create(  # type: ignore[union-attr]
            {"service": str, "slo": str, "minute": int, "good": int, "valid": int},
            pk=("service", "slo", "minute"),
        )
