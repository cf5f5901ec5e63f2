"""Registered instances in PostgreSQL, shared by every replica (DESIGN §8).

The rows are the SQLite twin's plus what replicas need to follow each other:
- `modify_index`: the catalog index the write was made at; the highest over all rows,
  tombstones included, is the store's index (no hot counter row that every write of every
  replica would lock, and deadlock on, in group-committed batches).
- `deleted`: a deregistration leaves a tombstone, so a replica polling for changes sees
  the removal too; tombstones older than TOMBSTONE_KEEP are purged by later deletes, those
  below the deleting replica's index only (one daemon's index is the highest stored, and
  stays so; with replicas the index is each one's own, see Catalog.index).
- `changed_xid`, `heartbeat_xid`: the transaction that last changed the row or renewed its
  lease. A poll asks for rows whose xid is at least the oldest transaction still running at
  the previous poll (`pg_snapshot_xmin`): every commit the previous poll could not see is
  among them however the commits of several replicas interleave, which a sequence or a
  timestamp compared with `>` would not promise.
- `heartbeat_at`: the database's clock at the last heartbeat flushed by any replica (or the
  last save); replicas read its age, never compare their own clocks with it.
- `changed_by`, `heartbeat_by`: the origin (below) of the last write and heartbeat. A
  replica's polls skip its own, and it takes no lease age from its own heartbeats: its
  memory has them already, by its own clock.

Each write sends `NOTIFY hms_registry` at its COMMIT with the key only, never the body:
`"<origin> <service>/<id>"` (names hold no space or slash), `origin` being this store's
random id so that a replica skips its own writes."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from typing import Any

import orjson

from registry.abc import Key, StoredRow
from registry.model import STORED, Instance, ProbeSpec
from registry.stores.pg import Blind, Connection, PgTransactor

CHANNEL = "hms_registry"
TOMBSTONE_KEEP = 3600.0  # seconds; longer than any replica goes without a poll or a resync

_NOW = "extract(epoch from clock_timestamp())::double precision"

MIGRATIONS = (
    """CREATE TABLE registry_instances (
        service TEXT NOT NULL,
        id TEXT NOT NULL,
        url TEXT NOT NULL,
        tags TEXT NOT NULL,
        meta TEXT NOT NULL,
        probe TEXT,
        ttl DOUBLE PRECISION,
        deregister_after DOUBLE PRECISION NOT NULL,
        registered_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        modify_index BIGINT NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        heartbeat_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        changed_by TEXT NOT NULL DEFAULT '',
        heartbeat_by TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (service, id)
    )""",
    "CREATE INDEX registry_instances_changed ON registry_instances (changed_xid)",
    "CREATE INDEX registry_instances_heartbeat ON registry_instances (heartbeat_xid)",
    "CREATE INDEX registry_instances_tombstones ON registry_instances (heartbeat_at) WHERE deleted",
)

_COLUMNS = (
    "service",
    "id",
    "url",
    "tags",
    "meta",
    "probe",
    "ttl",
    "deregister_after",
    "registered_at",
    "updated_at",
)
_SELECT = (
    f"SELECT {', '.join(_COLUMNS)}, modify_index, deleted, {_NOW} - heartbeat_at, heartbeat_by"
)
_UPSERT = (  # then: the index, the origin twice
    f"INSERT INTO registry_instances ({', '.join(_COLUMNS)}, modify_index, heartbeat_at, "  # noqa: S608 (constants only)
    f"changed_by, heartbeat_by) VALUES ({', '.join(['%s'] * len(_COLUMNS))}, %s, {_NOW}, "
    "%s, %s) ON CONFLICT (service, id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS[2:])
    + ", modify_index = GREATEST(registry_instances.modify_index, excluded.modify_index)"
    ", deleted = false, heartbeat_at = excluded.heartbeat_at"
    ", changed_xid = pg_current_xact_id(), heartbeat_xid = pg_current_xact_id()"
    ", changed_by = excluded.changed_by, heartbeat_by = excluded.heartbeat_by"
)
# A tombstone, also for a key never stored: the index must still rise to `index`.
_DELETE = (  # service, id, index, origin
    "INSERT INTO registry_instances (service, id, url, tags, meta, deregister_after, "  # noqa: S608 (constants only)
    "registered_at, updated_at, modify_index, deleted, heartbeat_at, changed_by) "
    f"VALUES (%s, %s, '', '[]', '{{}}', 0, 0, 0, %s, true, {_NOW}, %s) "
    "ON CONFLICT (service, id) DO UPDATE SET deleted = true, "
    "modify_index = GREATEST(registry_instances.modify_index, excluded.modify_index), "
    "heartbeat_at = excluded.heartbeat_at, changed_xid = pg_current_xact_id(), "
    "changed_by = excluded.changed_by"
)
_PURGE = (  # seconds kept, the deleting index
    "DELETE FROM registry_instances WHERE deleted "  # noqa: S608 (constants only)
    f"AND heartbeat_at < {_NOW} - %s "
    "AND modify_index < %s"
)
# Removal of a lapsed lease, only if no other replica has flushed a heartbeat since: the
# database's clock decides, as for every lease compared across replicas. A last heartbeat
# of the removing replica's own is its memory's to judge (by its own clock).
_EXPIRE = (  # index, origin, service, id, origin
    "UPDATE registry_instances SET deleted = true, "  # noqa: S608 (constants only)
    "modify_index = GREATEST(modify_index, %s), "
    f"heartbeat_at = {_NOW}, changed_xid = pg_current_xact_id(), changed_by = %s "
    "WHERE service = %s AND id = %s AND NOT deleted AND ttl IS NOT NULL "
    f"AND (heartbeat_by = %s OR heartbeat_at + ttl + deregister_after <= {_NOW})"
)
_HEARTBEATS = (  # origin, services, ids
    f"UPDATE registry_instances AS r SET heartbeat_at = {_NOW}, "  # noqa: S608 (constants only)
    "heartbeat_xid = pg_current_xact_id(), heartbeat_by = %s "
    "FROM unnest(%s::text[], %s::text[]) AS k(service, id) "
    "WHERE r.service = k.service AND r.id = k.id AND NOT r.deleted"
)
# A write and its notification in one statement (one round trip; sent at COMMIT).
_NOTIFYING = "WITH written AS ({}) SELECT pg_notify(%s, %s)"
_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"


class PgRegistryStore:
    """The registry's store (registry.abc.SharedRegistryStore) in PostgreSQL.

    One per replica: it remembers where its last poll stopped (`poll`)."""

    def __init__(self, db: PgTransactor) -> None:
        self._db = db
        self.origin = secrets.token_hex(6)
        self._mark = "0"  # the xmin of the previous poll (or of the load)

    async def load(self) -> tuple[list[Instance], int]:
        await self._db.migrate("registry", MIGRATIONS)

        def load(conn: Connection) -> tuple[list[Instance], int, str]:
            mark = _xmin(conn)  # before the read: nothing committed after it is missed
            rows = conn.execute(f"{_SELECT} FROM registry_instances WHERE NOT deleted")
            instances = [_instance(row) for row in rows]
            return instances, _index(conn), mark

        instances, index, self._mark = await self._db.read(load)
        return instances, index

    async def save(self, instance: Instance, index: int) -> None:
        row = _to_row(instance)

        def save(conn: Connection) -> None:
            origin, notice = self.origin, self._notice(instance.key)
            conn.execute(_NOTIFYING.format(_UPSERT), [*row, index, origin, origin, *notice])

        await self._db.write(Blind(save))

    async def delete(self, service: str, instance_id: str, index: int) -> None:
        def delete(conn: Connection) -> None:
            notice = self._notice((service, instance_id))
            arguments = [service, instance_id, index, self.origin, *notice]
            conn.execute(_NOTIFYING.format(_DELETE), arguments)
            conn.execute(_PURGE, [TOMBSTONE_KEEP, index])

        await self._db.write(Blind(delete))

    async def expire(self, service: str, instance_id: str, index: int) -> StoredRow | None:
        def expire(conn: Connection) -> StoredRow | None:
            arguments = [index, self.origin, service, instance_id, self.origin]
            if conn.execute(_EXPIRE, arguments).rowcount:
                conn.execute("SELECT pg_notify(%s, %s)", self._notice((service, instance_id)))
                return None
            return _read_rows(conn, [(service, instance_id)], mine=self.origin)[0]

        return await self._db.write(expire)

    async def save_heartbeats(self, keys: Iterable[Key]) -> None:
        ordered = sorted(keys)  # one locking order for every replica's flush
        services = [service for service, _ in ordered]
        ids = [instance_id for _, instance_id in ordered]

        def flush(conn: Connection) -> None:
            conn.execute(_HEARTBEATS, [self.origin, services, ids])

        await self._db.write(Blind(flush))

    async def read_rows(self, keys: Iterable[Key]) -> list[StoredRow]:
        wanted = list(keys)
        return await self._db.read(lambda conn: _read_rows(conn, wanted, mine=self.origin))

    async def keys(self) -> list[Key]:
        def keys(conn: Connection) -> list[Key]:
            rows = conn.execute("SELECT service, id FROM registry_instances WHERE NOT deleted")
            return [(service, instance_id) for service, instance_id in rows]

        return await self._db.read(keys)

    async def poll(self) -> tuple[list[Key], list[tuple[Key, float]]]:
        since = self._mark

        def poll(conn: Connection) -> tuple[list[Key], list[tuple[Key, float]], str]:
            mark = _xmin(conn)
            changed = [
                (service, instance_id)
                for service, instance_id in conn.execute(
                    "SELECT service, id FROM registry_instances "
                    "WHERE changed_xid >= %s::xid8 AND changed_by <> %s",
                    [since, self.origin],
                )
            ]
            renewed = [
                ((service, instance_id), max(0.0, float(age)))
                for service, instance_id, age in conn.execute(
                    f"SELECT service, id, {_NOW} - heartbeat_at FROM registry_instances "  # noqa: S608
                    "WHERE heartbeat_xid >= %s::xid8 AND heartbeat_by <> %s AND NOT deleted",
                    [since, self.origin],
                )
            ]
            return changed, renewed, mark

        changed, renewed, self._mark = await self._db.read(poll)
        return changed, renewed

    def notified(self, payload: str) -> list[Key]:
        origin, _, key = payload.partition(" ")
        service, slash, instance_id = key.partition("/")
        if origin == self.origin or not slash:
            return []
        return [(service, instance_id)]

    def _notice(self, key: Key) -> list[str]:
        """pg_notify's arguments for a write to `key`."""
        return [CHANNEL, f"{self.origin} {key[0]}/{key[1]}"]


def _xmin(conn: Connection) -> str:
    row = conn.execute(_XMIN).fetchone()
    assert row is not None
    return str(row[0])


def _index(conn: Connection) -> int:
    row = conn.execute("SELECT coalesce(max(modify_index), 0) FROM registry_instances").fetchone()
    return int(row[0]) if row else 0


def _read_rows(conn: Connection, keys: list[Key], *, mine: str | None) -> list[StoredRow]:
    """The rows of `keys`, in that order; a key without a live row reads as removed. A
    heartbeat this replica (origin `mine`) made has no age: its memory knows it better."""
    found: dict[Key, tuple[Any, ...]] = {}
    rows = conn.execute(
        f"{_SELECT} FROM registry_instances "  # noqa: S608 (constants only)
        "WHERE (service, id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        [[service for service, _ in keys], [instance_id for _, instance_id in keys]],
    )
    for row in rows:
        found[(row[0], row[1])] = row
    out = []
    for key in keys:
        row = found.get(key)
        if row is None:
            out.append(StoredRow(key=key, instance=None, index=0, heartbeat_age=None))
            continue
        live = not row[11]
        out.append(
            StoredRow(
                key=key,
                instance=_instance(row) if live else None,
                index=int(row[10]),
                heartbeat_age=max(0.0, float(row[12])) if live and row[13] != mine else None,
            )
        )
    return out


def _to_row(instance: Instance) -> list[object]:
    return [
        instance.service,
        instance.id,
        instance.url,
        orjson.dumps(instance.tags).decode(),
        orjson.dumps(dict(instance.meta)).decode(),
        instance.probe.model_dump_json(exclude_none=True) if instance.probe else None,
        instance.ttl,
        instance.deregister_after,
        instance.registered_at,
        instance.updated_at,
    ]


def _instance(row: tuple[Any, ...]) -> Instance:
    service, instance_id, url, tags, meta, probe, ttl, deregister_after = row[:8]
    registered_at, updated_at = row[8:10]
    return Instance(
        service=service,
        id=instance_id,
        url=url,
        tags=tuple(json.loads(tags)),
        meta=json.loads(meta),
        probe=ProbeSpec.model_validate_json(probe, context=STORED) if probe is not None else None,
        ttl=ttl,
        deregister_after=deregister_after,
        registered_at=registered_at,
        updated_at=updated_at,
    )
