"""Schedule marks in the cluster's PostgreSQL (the `workflow_schedules` table, as on
SQLite: workflows/stores/sqlite_schedules.py): how far each workflow's schedule has been
served, so a tick missed while no replica ran is known at start."""

from __future__ import annotations

from registry.stores.pg import Connection, PgTransactor
from workflows.abc import ScheduleMark

__all__ = ["MIGRATIONS", "PgScheduleStore", "write_mark"]

MIGRATIONS = (
    """CREATE TABLE workflow_schedules (
        workflow TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        tick DOUBLE PRECISION NOT NULL
    )""",
)
_UPSERT = (
    "INSERT INTO workflow_schedules (workflow, cron, timezone, tick) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (workflow) DO UPDATE SET "
    "cron = excluded.cron, timezone = excluded.timezone, tick = excluded.tick"
)


def write_mark(conn: Connection, mark: ScheduleMark) -> None:
    """Store a mark inside another write (the process its tick starts)."""
    conn.execute(_UPSERT, (mark.workflow, mark.cron, mark.timezone, mark.tick))


class PgScheduleStore:
    """A `ScheduleStore` (workflows/abc.py) on the cluster's PostgreSQL."""

    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("schedules", MIGRATIONS)

    async def marks(self) -> list[ScheduleMark]:
        def read(conn: Connection) -> list[ScheduleMark]:
            rows = conn.execute(
                "SELECT workflow, cron, timezone, tick FROM workflow_schedules"
            ).fetchall()
            return [ScheduleMark(workflow=w, cron=c, timezone=z, tick=t) for w, c, z, t in rows]

        return await self._db.read(read)

    async def mark(self, mark: ScheduleMark) -> None:
        await self._db.write(lambda conn: write_mark(conn, mark))

    async def forget(self, workflow: str) -> None:
        def write(conn: Connection) -> None:
            conn.execute("DELETE FROM workflow_schedules WHERE workflow = %s", [workflow])

        await self._db.write(write)
