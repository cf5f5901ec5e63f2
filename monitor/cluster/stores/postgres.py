"""Members and the leader lease in the PostgreSQL every replica shares.

A member is alive while its heartbeat is younger than the lease AND its database session
lives: joining takes a session-level advisory lock (key = the member's row id) on the
writing connection, and the others look for it in pg_locks. A replica killed with -9 loses
its session, hence its lock, at once, so it is seen dead at the next renewal of any other
(well under a second), not a lease later. A member whose session changed (the writing
connection was reopened) or whose heartbeat went stale is dead for good: its renewal
answers None and it joins again under a new key, so nothing it claimed in its previous
life is acted on by it again.

The leader lease is one row: (holder, epoch, until). It passes to a renewing member when
it has no holder, its `until` has passed, or its holder is dead; the epoch grows each time
the holder changes. All times come from the database's clock."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from registry.stores.pg import Connection, PgTransactor

from ..abc import Member, View

log = logging.getLogger(__name__)

MIGRATIONS = (
    """CREATE TABLE cluster_members (
        id BIGSERIAL PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        replica_id TEXT NOT NULL,
        joined_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        address TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE cluster_leader (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        holder TEXT,
        epoch BIGINT NOT NULL,
        until DOUBLE PRECISION NOT NULL
    )""",
    "INSERT INTO cluster_leader (holder, epoch, until) VALUES (NULL, 0, 0)",
    # The application_name its connections carry (monitor/storage/postgres.py SESSION_TAG).
    "ALTER TABLE cluster_members ADD COLUMN session TEXT NOT NULL DEFAULT ''",
)

# The f-strings below (noqa: S608) only splice these constant fragments, never a value.
_NOW = "extract(epoch FROM clock_timestamp())::double precision"
# The session holding member m's advisory lock, if any (pg_advisory_lock(bigint) shows in
# pg_locks as classid = high 32 bits, objid = low 32 bits, objsubid = 1).
_LOCK_HOLDER = """(SELECT l.pid FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = (m.id >> 32)::oid AND l.objid = (m.id & 4294967295)::oid
    LIMIT 1)"""
_LIVE = f"m.heartbeat_at >= %(now)s - %(lease)s AND {_LOCK_HOLDER} IS NOT NULL"


class PgMemberStore:
    """A `MemberStore` (monitor/cluster/abc.py) on the PostgreSQL every replica shares."""

    shared = True

    def __init__(self, db: PgTransactor, *, session: str = "") -> None:
        """`session`: the application_name (before any space) of every connection this
        replica opens; a stale member's sessions are terminated by the leader."""
        self._db, self._session = db, session

    async def create_tables(self) -> None:
        await self._db.migrate("cluster", MIGRATIONS)

    async def join(self, key: str, replica_id: str, address: str = "") -> None:
        def write(conn: Connection) -> None:
            (member_id,) = _one(
                conn,
                "INSERT INTO cluster_members "  # noqa: S608
                "(key, replica_id, address, session, joined_at, heartbeat_at) "
                f"VALUES (%s, %s, %s, %s, {_NOW}, {_NOW}) RETURNING id",
                [key, replica_id, address, self._session],
            )
            # Session-level: held after this transaction, until the session ends.
            conn.execute("SELECT pg_advisory_lock(%s)", [member_id])

        await self._db.write(write)

    async def renew(self, key: str, lease: float) -> View | None:
        return await self._db.write(lambda conn: _renew(conn, key, lease))

    async def leave(self, key: str) -> None:
        def write(conn: Connection) -> None:
            row = conn.execute(
                "DELETE FROM cluster_members WHERE key = %s RETURNING id", [key]
            ).fetchone()
            if row is not None:
                _unlock_if_mine(conn, row[0])
            conn.execute(
                "UPDATE cluster_leader SET holder = NULL, until = 0 WHERE holder = %s", [key]
            )

        await self._db.write(write)


def _one(conn: Connection, sql: str, params: Any) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return tuple(row)


def _unlock_if_mine(conn: Connection, member_id: int) -> None:
    conn.execute(
        "SELECT pg_advisory_unlock(m.id) FROM (SELECT %s::bigint AS id) m "  # noqa: S608
        f"WHERE {_LOCK_HOLDER} = pg_backend_pid()",
        [member_id],
    )


def _terminate(conn: Connection, sessions: list[str], params: dict[str, Any]) -> None:
    """End the database sessions of members seen stale (paused, cut off: their sessions
    may live on for hours), unless a live member carries the same tag (the same process
    rejoined). Each connection's application_name is its process's tag, then a space and
    what it is for. Best effort: without the privilege (another role's sessions), or on any
    other error short of a broken connection, nothing is ended and the renewal goes on."""
    if not sessions:
        return
    try:
        with conn.transaction():  # a savepoint: the renewal commits whatever happens here
            conn.execute(
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a "  # noqa: S608
                "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
                "AND split_part(a.application_name, ' ', 1) = ANY(%(sessions)s) "
                "AND NOT EXISTS (SELECT 1 FROM cluster_members m "
                f"WHERE m.session = split_part(a.application_name, ' ', 1) AND {_LIVE})",
                {**params, "sessions": sessions},
            )
    except psycopg.Error as exc:  # best effort: never at the cost of the renewal
        if conn.broken:
            raise
        log.warning("cannot end the sessions of a stale member (%s): %s", sessions, exc)


def _renew(conn: Connection, key: str, lease: float) -> View | None:
    (now,) = _one(conn, f"SELECT {_NOW}", None)
    params = {"key": key, "now": now, "lease": lease}
    row = conn.execute(
        f"SELECT m.id, {_LOCK_HOLDER} = pg_backend_pid(), m.heartbeat_at >= %(now)s - %(lease)s "  # noqa: S608
        "FROM cluster_members m WHERE m.key = %(key)s",
        params,
    ).fetchone()
    if row is None:
        return None  # reaped
    member_id, session_holds_lock, fresh = row
    if not (session_holds_lock and fresh):
        # Seen dead by the others (they may have taken its share): never alive again.
        conn.execute("DELETE FROM cluster_members WHERE id = %s", [member_id])
        _unlock_if_mine(conn, member_id)
        return None
    conn.execute("UPDATE cluster_members SET heartbeat_at = %s WHERE id = %s", [now, member_id])

    # The lease row is locked first, then the holder's liveness read: a holder that renewed
    # meanwhile is seen (each statement reads what is committed when it starts).
    holder, epoch, until = _one(
        conn, "SELECT holder, epoch, until FROM cluster_leader FOR UPDATE", None
    )
    if holder == key:
        conn.execute("UPDATE cluster_leader SET until = %s", [now + lease])
    else:
        holder_alive = holder is not None and (
            conn.execute(
                f"SELECT 1 FROM cluster_members m WHERE m.key = %(holder)s AND {_LIVE}",  # noqa: S608
                {**params, "holder": holder},
            ).fetchone()
            is not None
        )
        if holder is None or until < now or not holder_alive:
            holder, epoch = key, epoch + 1
            conn.execute(
                "UPDATE cluster_leader SET holder = %s, epoch = %s, until = %s",
                [holder, epoch, now + lease],
            )
    if holder == key:
        gone = conn.execute(
            f"DELETE FROM cluster_members m WHERE NOT ({_LIVE}) "  # noqa: S608
            f"RETURNING m.session, m.heartbeat_at < %(now)s - %(lease)s AND {_LOCK_HOLDER} "
            "IS NOT NULL",
            params,
        ).fetchall()
        # Stale with its session still holding the lock (paused, cut off). Without its lock
        # its sessions ended (killed, a connection reopened, the database restarted): the
        # ones its tag now carries are new, from a replica rejoining as it should.
        _terminate(conn, sorted({session for session, stale in gone if stale and session}), params)
    members = tuple(
        Member(key=k, replica_id=r, heartbeat_at=h, address=a)
        for k, r, h, a in conn.execute(
            "SELECT m.key, m.replica_id, m.heartbeat_at, m.address "  # noqa: S608
            f"FROM cluster_members m WHERE {_LIVE} "
            "ORDER BY m.key",
            params,
        )
    )
    live_holder = holder if any(m.key == holder for m in members) else None
    return View(members=members, leader=live_holder, epoch=epoch)
