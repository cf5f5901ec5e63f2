"""Health states in PostgreSQL, shared by every replica (monitor/health/states_abc.py).

A save sends NOTIFY on CHANNEL with the changed keys at COMMIT; a replica that hears it
reads what changed (`changed`), and polls it behind, since a notification is lost with the
listening connection. `changed_at` is the database's clock, never a replica's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from monitor.health.states_abc import Key, StoredHealth
from monitor.storage.postgres import notify
from registry import HealthState
from registry.stores.pg import Connection, PgTransactor

CHANNEL = "hms_health"
MAX_PAYLOAD = 7000  # NOTIFY payloads stop at 8000 bytes; past this: "" (some keys changed)

MIGRATIONS = (
    """CREATE TABLE health_states (
        service TEXT NOT NULL,
        instance TEXT NOT NULL,
        state TEXT NOT NULL,
        successes BIGINT NOT NULL,
        failures BIGINT NOT NULL,
        reason TEXT NOT NULL,
        last_probe TEXT,
        changed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (service, instance)
    )""",
    "CREATE INDEX health_states_changed_at ON health_states (changed_at)",
)

_COLUMNS = "service, instance, state, successes, failures, reason, last_probe"
_NOW = "extract(epoch FROM clock_timestamp())"
_UPSERT = (
    f"INSERT INTO health_states ({_COLUMNS}, changed_at) "  # noqa: S608 (constants)
    f"VALUES (%s, %s, %s, %s, %s, %s, %s, {_NOW}) "
    "ON CONFLICT (service, instance) DO UPDATE SET state = excluded.state, "
    "successes = excluded.successes, failures = excluded.failures, "
    "reason = excluded.reason, last_probe = excluded.last_probe, changed_at = excluded.changed_at"
)


class PgHealthStateStore:
    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def open(self) -> None:
        await self._db.migrate("health_states", MIGRATIONS)

    async def save(self, states: Sequence[StoredHealth], gone: Sequence[Key]) -> None:
        rows = [
            (s.service, s.instance, s.state.value, s.successes, s.failures, s.reason, s.last_probe)
            for s in states
        ]
        keys = [s.key for s in states] + list(gone)
        payload = orjson.dumps(keys).decode()

        def save(conn: Connection) -> None:
            with conn.cursor() as cursor:
                if rows:
                    cursor.executemany(_UPSERT, rows)
                if gone:
                    cursor.executemany(
                        "DELETE FROM health_states WHERE service = %s AND instance = %s", gone
                    )
            notify(conn, CHANNEL, payload if len(payload) <= MAX_PAYLOAD else "")

        await self._db.write(save)

    async def load(self, keys: Sequence[Key]) -> list[StoredHealth]:
        services, instances = [k[0] for k in keys], [k[1] for k in keys]

        def load(conn: Connection) -> list[StoredHealth]:
            cursor = conn.execute(
                f"SELECT {_COLUMNS} FROM health_states "  # noqa: S608
                "WHERE (service, instance) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                [services, instances],
            )
            return [_stored(row) for row in cursor]

        return await self._db.read(load)

    async def changed(self, since: float | None) -> tuple[list[StoredHealth], float]:
        def changed(conn: Connection) -> tuple[list[StoredHealth], float]:
            now = conn.execute(f"SELECT {_NOW}").fetchone()
            assert now is not None
            cursor = conn.execute(
                f"SELECT {_COLUMNS} FROM health_states WHERE changed_at > %s",  # noqa: S608
                [-1.0 if since is None else since],
            )
            return [_stored(row) for row in cursor], float(now[0])

        return await self._db.read(changed)


def _stored(row: tuple[Any, ...]) -> StoredHealth:
    service, instance, state, successes, failures, reason, last_probe = row
    return StoredHealth(
        service=service,
        instance=instance,
        state=HealthState(state),
        successes=successes,
        failures=failures,
        reason=reason,
        last_probe=last_probe,
    )
