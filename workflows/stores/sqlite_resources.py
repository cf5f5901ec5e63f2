"""Resource holds and waiters in the daemon's SQLite file (its own table).

A row is one process's request at one step: `held` once granted, else waiting,
`seq` its place in the queue. Rows go when their process ends (`settle`), so a
unit is held exactly as long as the table says; the pool in memory
(workflows/resources.py) is rebuilt from these rows at start.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlite_utils

from registry import Transactor
from workflows.abc import Hold

__all__ = ["SqliteResourceStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resource_holds (
    process TEXT NOT NULL,
    step TEXT NOT NULL,
    resource TEXT NOT NULL,
    key TEXT,
    units INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (process, step)
) WITHOUT ROWID;
"""
_WAIT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (process, step) DO NOTHING"
)
_GRANT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (process, step) DO UPDATE SET held = 1"
)


class SqliteResourceStore:
    """The `ResourceStore` (workflows/abc.py) in the daemon's SQLite file; its writes share
    the group commit with the steps' checkpoints."""

    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        def create(d: sqlite_utils.Database) -> None:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                d.conn.execute(statement)

        await self._db.write(create)

    async def holds(self) -> list[Hold]:
        def read(d: sqlite_utils.Database) -> list[Hold]:
            rows = d.execute(
                "SELECT process, step, resource, key, units, seq, held FROM resource_holds "
                "ORDER BY seq"
            ).fetchall()
            return [
                Hold(process=p, step=s, resource=r, key=k, units=u, seq=seq, held=bool(held))
                for p, s, r, k, u, seq, held in rows
            ]

        return await self._db.read(read)

    async def wait(self, hold: Hold) -> None:
        args = (hold.process, hold.step, hold.resource, hold.key, hold.units, hold.seq)
        await self._db.write(lambda d: d.conn.execute(_WAIT, args))

    async def settle(
        self,
        *,
        released: Sequence[str] = (),
        left: Sequence[tuple[str, str]] = (),
        granted: Sequence[Hold] = (),
    ) -> None:
        gone = [(process,) for process in released]
        grants = [(h.process, h.step, h.resource, h.key, h.units, h.seq) for h in granted]

        def write(d: sqlite_utils.Database) -> None:
            conn = d.conn
            if gone:
                conn.executemany("DELETE FROM resource_holds WHERE process = ?", gone)
            if left:
                conn.executemany("DELETE FROM resource_holds WHERE process = ? AND step = ?", left)
            if grants:
                conn.executemany(_GRANT, grants)

        await self._db.write(write)
