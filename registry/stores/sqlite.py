"""Registered instances in SQLite (static ones come from config and are not stored).

`Transactor` is the SQLite stores' handle (serialized reads, durable writes), not a domain
interface: every SQLite store of every package takes one."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol, TypeVar

import orjson
import sqlite_utils

from registry.model import STORED, Instance, ProbeSpec

T = TypeVar("T")

INSTANCES = "registry_instances"
STATE = "registry_state"


class Transactor(Protocol):
    """What the composition root hands down: serialized reads and durable writes."""

    async def read(self, fn: Callable[[sqlite_utils.Database], T]) -> T: ...

    async def write(self, fn: Callable[[sqlite_utils.Database], T], *, ride: bool = True) -> T:
        """`ride=False`: bookkeeping, never the change a request's audit record goes with."""
        ...


class SqliteRegistryStore:
    """The registry's store (registry.abc.RegistryStore) in the daemon's SQLite file."""

    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def load(self) -> tuple[list[Instance], int]:
        await self._db.write(_create_tables)
        return await self._db.read(_load)

    async def save(self, instance: Instance, index: int) -> None:
        row = _to_row(instance)

        def save(db: sqlite_utils.Database) -> None:
            # A prepared statement: Table.upsert introspects the table on every call (~10x slower).
            db.execute(_UPSERT, [row[column] for column in _COLUMNS])
            _set_index(db, index)

        await self._db.write(save)

    async def delete(self, service: str, instance_id: str, index: int) -> None:
        def delete(db: sqlite_utils.Database) -> None:
            db.table(INSTANCES).delete_where("service = ? AND id = ?", [service, instance_id])
            _set_index(db, index)

        await self._db.write(delete)


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
_UPSERT = (
    f"INSERT INTO registry_instances ({', '.join(_COLUMNS)}) "  # noqa: S608 (constants only)
    f"VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT(service, id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS[2:])
)


def _create_tables(db: sqlite_utils.Database) -> None:
    if not db[INSTANCES].exists():
        db[INSTANCES].create(  # type: ignore[union-attr]
            {
                "service": str,
                "id": str,
                "url": str,
                "tags": str,
                "meta": str,
                "probe": str,
                "ttl": float,
                "deregister_after": float,
                "registered_at": float,
                "updated_at": float,
            },
            pk=("service", "id"),
            not_null={"service", "id", "url", "deregister_after"},
        )
    if not db[STATE].exists():
        db[STATE].create({"key": str, "value": int}, pk="key")  # type: ignore[union-attr]


def _set_index(db: sqlite_utils.Database, index: int) -> None:
    db.execute(
        "INSERT INTO registry_state(key, value) VALUES ('index', ?) "
        "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
        [index],
    )


def _load(db: sqlite_utils.Database) -> tuple[list[Instance], int]:
    instances = [_from_row(row) for row in db[INSTANCES].rows]
    row = db.execute("SELECT value FROM registry_state WHERE key = 'index'").fetchone()
    return instances, int(row[0]) if row else 0


def _to_row(instance: Instance) -> dict[str, object]:
    return {
        "service": instance.service,
        "id": instance.id,
        "url": instance.url,
        "tags": orjson.dumps(instance.tags).decode(),
        "meta": orjson.dumps(dict(instance.meta)).decode(),
        "probe": instance.probe.model_dump_json(exclude_none=True) if instance.probe else None,
        "ttl": instance.ttl,
        "deregister_after": instance.deregister_after,
        "registered_at": instance.registered_at,
        "updated_at": instance.updated_at,
    }


def _from_row(row: dict[str, object]) -> Instance:
    probe = row["probe"]
    ttl = row["ttl"]
    return Instance(
        service=str(row["service"]),
        id=str(row["id"]),
        url=str(row["url"]),
        tags=tuple(json.loads(str(row["tags"]))),
        meta=json.loads(str(row["meta"])),
        probe=(
            ProbeSpec.model_validate_json(str(probe), context=STORED) if probe is not None else None
        ),
        ttl=float(ttl) if isinstance(ttl, (int, float)) else None,
        deregister_after=float(row["deregister_after"]),  # type: ignore[arg-type]
        registered_at=float(row["registered_at"] or 0.0),  # type: ignore[arg-type]
        updated_at=float(row["updated_at"] or 0.0),  # type: ignore[arg-type]
    )
