"""Schedule marks in the daemon's SQLite file (its own table): how far each workflow's
schedule has been served, so a tick missed while the daemon was down is known at start.

Not derived from the processes' idempotency keys: finished processes are pruned after
`process_retention`, and a monthly or yearly schedule would then forget its last tick
and start it again.
"""

from __future__ import annotations

import sqlite_utils

from registry import Transactor
from workflows.abc import ScheduleMark

__all__ = ["SqliteScheduleStore", "write_mark"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflow_schedules (
    workflow TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    timezone TEXT NOT NULL,
    tick REAL NOT NULL
) WITHOUT ROWID
"""
_UPSERT = (
    "INSERT INTO workflow_schedules (workflow, cron, timezone, tick) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (workflow) DO UPDATE SET "
    "cron = excluded.cron, timezone = excluded.timezone, tick = excluded.tick"
)


def write_mark(d: sqlite_utils.Database, mark: ScheduleMark) -> None:
    """Store a mark inside another write (the process its tick starts)."""
    d.conn.execute(_UPSERT, (mark.workflow, mark.cron, mark.timezone, mark.tick))


class SqliteScheduleStore:
    """A `ScheduleStore` (workflows/abc.py) on the daemon's database."""

    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.write(lambda d: d.conn.execute(_SCHEMA) and None)

    async def marks(self) -> list[ScheduleMark]:
        def read(d: sqlite_utils.Database) -> list[ScheduleMark]:
            rows = d.execute(
                "SELECT workflow, cron, timezone, tick FROM workflow_schedules"
            ).fetchall()
            return [ScheduleMark(workflow=w, cron=c, timezone=z, tick=t) for w, c, z, t in rows]

        return await self._db.read(read)

    async def mark(self, mark: ScheduleMark) -> None:
        await self._db.write(lambda d: write_mark(d, mark))

    async def forget(self, workflow: str) -> None:
        def write(d: sqlite_utils.Database) -> None:
            d.conn.execute("DELETE FROM workflow_schedules WHERE workflow = ?", [workflow])

        await self._db.write(write)
