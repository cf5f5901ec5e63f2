"""Resource holds and waiters in the cluster's PostgreSQL (the `resource_holds` table, as
on SQLite: workflows/stores/sqlite_resources.py).

Replicas grant from their own memory, so the table is what keeps a capacity: a grant made
with `capacities` first locks its (resource, key) for the rest of the transaction (an
advisory lock: a slot has no row of its own to lock), then inserts itself only if its
units fit beside those already held there. Two replicas granting the last unit at once
take the lock one after the other, and the second finds it held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import psycopg

from registry.stores.pg import Connection, PgTransactor
from workflows.abc import Hold, Overbooked

__all__ = ["MIGRATIONS", "PgResourceStore"]

MIGRATIONS = (
    """CREATE TABLE resource_holds (
        process TEXT NOT NULL,
        step TEXT NOT NULL,
        resource TEXT NOT NULL,
        key TEXT,
        units INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        held BOOLEAN NOT NULL,
        PRIMARY KEY (process, step)
    )""",
    "CREATE INDEX resource_holds_slot ON resource_holds (resource, key) WHERE held",
)
_WAIT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (%s, %s, %s, %s, %s, %s, FALSE) ON CONFLICT (process, step) DO NOTHING"
)
_GRANT = (
    "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "
    "VALUES (%s, %s, %s, %s, %s, %s, TRUE) ON CONFLICT (process, step) DO UPDATE SET held = TRUE"
)
# Transaction-scoped, released at COMMIT; the first key keeps these apart from other locks.
_LOCK_SLOT = "SELECT pg_advisory_xact_lock(hashtext('resource_holds'), hashtext(%s))"


def _grant_if_fits(key_test: str) -> str:
    """The grant, when its units fit beside those the other rows of its slot hold."""
    return (  # key_test is one of the two constants below: no input reaches the string
        "INSERT INTO resource_holds (process, step, resource, key, units, seq, held) "  # noqa: S608
        "SELECT %(process)s, %(step)s, %(resource)s, %(key)s, %(units)s, %(seq)s, TRUE "
        "WHERE %(units)s + (SELECT coalesce(sum(units), 0) FROM resource_holds "
        f"WHERE resource = %(resource)s AND {key_test} AND held "
        "AND NOT (process = %(process)s AND step = %(step)s)) <= %(capacity)s "
        "ON CONFLICT (process, step) DO UPDATE SET held = TRUE"
    )


# Two statements, not `key IS NOT DISTINCT FROM`: that one cannot use the slot index.
_GRANT_IF_FITS = _grant_if_fits("key = %(key)s")
_GRANT_IF_FITS_GLOBAL = _grant_if_fits("key IS NULL")


class PgResourceStore:
    """The `ResourceStore` (workflows/abc.py) on the cluster's PostgreSQL; its writes share
    the group commit with the steps' checkpoints."""

    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("resources", MIGRATIONS)

    async def holds(self) -> list[Hold]:
        def read(conn: Connection) -> list[Hold]:
            rows = conn.execute(
                "SELECT process, step, resource, key, units, seq, held FROM resource_holds "
                "ORDER BY seq"
            ).fetchall()
            return [
                Hold(process=p, step=s, resource=r, key=k, units=u, seq=seq, held=held)
                for p, s, r, k, u, seq, held in rows
            ]

        return await self._db.read(read)

    async def wait(self, hold: Hold) -> None:
        args = (hold.process, hold.step, hold.resource, hold.key, hold.units, hold.seq)
        await self._db.write(lambda conn: conn.execute(_WAIT, args) and None)

    async def settle(
        self,
        *,
        released: Sequence[str] = (),
        left: Sequence[tuple[str, str]] = (),
        granted: Sequence[Hold] = (),
        capacities: Mapping[str, int] | None = None,
    ) -> None:
        checked = capacities or {}
        grants = [
            (h.process, h.step, h.resource, h.key, h.units, h.seq)
            for h in granted
            if h.resource not in checked
        ]
        fitting = [h for h in granted if h.resource in checked]
        # Every slot locked up front, in one order, so two settles never deadlock over them
        # (settles batched into one transaction still may: PostgreSQL aborts one batch, and
        # PgDatabase replays it write by write).
        slots = sorted({orjson.dumps([h.resource, h.key]).decode() for h in fitting})

        def write(conn: Connection) -> None:
            with conn.cursor() as cursor:
                if released:
                    cursor.executemany(
                        "DELETE FROM resource_holds WHERE process = %s", [(p,) for p in released]
                    )
                if left:
                    cursor.executemany(
                        "DELETE FROM resource_holds WHERE process = %s AND step = %s", left
                    )
                if grants:
                    cursor.executemany(_GRANT, grants)
                for slot in slots:
                    cursor.execute(_LOCK_SLOT, [slot])
                refused = [h for h in fitting if not _granted(cursor, h, checked[h.resource])]
            if refused:
                raise Overbooked(refused)  # the batch's savepoint takes back the rest

        await self._db.write(write)


def _granted(cursor: psycopg.Cursor[Any], hold: Hold, capacity: int) -> bool:
    """Whether the grant fit (and is written), its slot locked by this transaction."""
    statement = _GRANT_IF_FITS if hold.key is not None else _GRANT_IF_FITS_GLOBAL
    args = {
        "process": hold.process,
        "step": hold.step,
        "resource": hold.resource,
        "key": hold.key,
        "units": hold.units,
        "seq": hold.seq,
        "capacity": capacity,
    }
    return bool(cursor.execute(statement, args).rowcount)
