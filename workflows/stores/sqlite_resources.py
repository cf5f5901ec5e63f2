"""Resource holds and waiters in the daemon's SQLite file (its own table).

A row is one process's request at one step: `held` once granted, else waiting,
`seq` its place in the queue. Rows go when their process ends (`settle`), so a
unit is held exactly as long as the table says; the pool in memory
(workflows/resources.py) is rebuilt from these rows at start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlite_utils

from registry import Transactor
from workflows.abc import Hold, Overbooked

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
CREATE INDEX IF NOT EXISTS resource_holds_slot ON resource_holds (resource, key) WHERE held;
"""
_WAIT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (process, step) DO NOTHING"
)
_GRANT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (process, step) DO UPDATE SET held = 1"
)
# The grant, when its units fit beside those the other rows of its (resource, key) hold:
# one statement, so it reads the sum under the write lock it takes first.
_GRANT_IF_FITS = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "SELECT :process, :step, :resource, :key, :units, :seq, 1 WHERE :units + ("
    "SELECT coalesce(sum(units), 0) FROM resource_holds WHERE resource = :resource AND "
    "key IS :key AND held AND NOT (process = :process AND step = :step)) <= :capacity "
    "ON CONFLICT (process, step) DO UPDATE SET held = 1"
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
        capacities: Mapping[str, int] | None = None,
    ) -> None:
        gone = [(process,) for process in released]
        checked = capacities or {}
        grants = [
            (h.process, h.step, h.resource, h.key, h.units, h.seq)
            for h in granted
            if h.resource not in checked
        ]
        fitting = [h for h in granted if h.resource in checked]

        def write(d: sqlite_utils.Database) -> None:
            conn = d.conn
            if gone:
                conn.executemany("DELETE FROM resource_holds WHERE process = ?", gone)
            if left:
                conn.executemany("DELETE FROM resource_holds WHERE process = ? AND step = ?", left)
            if grants:
                conn.executemany(_GRANT, grants)
            refused = [
                h
                for h in fitting
                if not conn.execute(_GRANT_IF_FITS, _fitting(h, checked[h.resource])).rowcount
            ]
            if refused:
                raise Overbooked(refused)  # the batch's savepoint takes back the rest

        await self._db.write(write)


def _fitting(hold: Hold, capacity: int) -> dict[str, object]:
    return {
        "process": hold.process,
        "step": hold.step,
        "resource": hold.resource,
        "key": hold.key,
        "units": hold.units,
        "seq": hold.seq,
        "capacity": capacity,
    }
