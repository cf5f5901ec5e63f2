"""OutboxStore on the daemon's SQLite database (the notification_outbox table).

One daemon writes the file, so every row has the one owner the notifier names; `claim`
and `adopt` keep the PostgreSQL twin's contract all the same."""

from __future__ import annotations

import json
from collections.abc import Collection

import sqlite_utils

from monitor.notify.abc import Delivery, DeliveryTaken, OncePer
from registry import Transactor


class SqliteOutboxStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.write(_create_table)

    async def load(self, owner: str) -> list[Delivery]:
        return await self._db.read(lambda db: _load(db, owner))

    async def add(self, delivery: Delivery, owner: str, *, once: OncePer) -> bool:
        return await self._db.write(lambda db: _add(db, delivery, owner, once))

    async def save(self, delivery: Delivery, owner: str) -> None:
        if not await self._db.write(lambda db: _save(db, delivery, owner)):
            raise DeliveryTaken(delivery.id)

    async def claim(self, delivery: Delivery, owner: str) -> None:
        def claim(db: sqlite_utils.Database) -> int:
            cursor = db.execute(
                "UPDATE notification_outbox SET attempts = ?, due = ? WHERE id = ? AND owner = ?",
                (delivery.attempts, delivery.due, delivery.id, owner),
            )
            return cursor.rowcount

        if not await self._db.write(claim):
            raise DeliveryTaken(delivery.id)

    async def delete(self, delivery_id: str) -> None:
        await self._db.write(lambda db: _delete(db, delivery_id))

    async def owners(self) -> set[str]:
        def read(db: sqlite_utils.Database) -> set[str]:
            rows = db.execute("SELECT DISTINCT owner FROM notification_outbox").fetchall()
            return {owner for (owner,) in rows}

        return await self._db.read(read)

    async def adopt(self, owner: str, dead_owners: Collection[str]) -> list[Delivery]:
        dead = [name for name in dead_owners if name != owner]
        if not dead:
            return []

        def adopt(db: sqlite_utils.Database) -> list[Delivery]:
            cursor = db.execute(
                "UPDATE notification_outbox SET owner = ? "
                "WHERE owner IN (SELECT value FROM json_each(?)) "
                "RETURNING id, name, topic, body, attempts, due",
                (owner, json.dumps(dead)),
            )
            return _deliveries(cursor.fetchall())

        return sorted(await self._db.write(adopt), key=lambda delivery: delivery.due)


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS notification_outbox (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "topic TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, due REAL NOT NULL, "
        "owner TEXT NOT NULL DEFAULT '')"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS notification_recent (name TEXT NOT NULL, "
        "subject TEXT NOT NULL, fingerprint TEXT NOT NULL, at REAL NOT NULL, "
        "PRIMARY KEY (name, subject))"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS notification_recent_at ON notification_recent (name, at)"
    )
    # Outboxes from before owners: their rows are the one daemon's, whose owner is ''.
    if "owner" not in db["notification_outbox"].columns_dict:
        db.execute("ALTER TABLE notification_outbox ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


def _add(db: sqlite_utils.Database, delivery: Delivery, owner: str, once: OncePer) -> bool:
    since = once.now - once.interval
    # Subjects come from clients too: what is past its interval goes.
    db.execute("DELETE FROM notification_recent WHERE name = ? AND at <= ?", (delivery.name, since))
    remembered = db.execute(
        "INSERT INTO notification_recent (name, subject, fingerprint, at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (name, subject) DO UPDATE SET fingerprint = excluded.fingerprint, "
        "at = excluded.at WHERE notification_recent.fingerprint <> excluded.fingerprint "
        "OR notification_recent.at <= ?",
        (delivery.name, once.subject, once.fingerprint, once.now, since),
    )
    if not remembered.rowcount:
        return False
    _save(db, delivery, owner)
    return True


def _save(db: sqlite_utils.Database, delivery: Delivery, owner: str) -> int:
    cursor = db.execute(
        "INSERT INTO notification_outbox (id, name, topic, body, attempts, due, owner) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, topic = excluded.topic, "
        "body = excluded.body, attempts = excluded.attempts, due = excluded.due "
        "WHERE notification_outbox.owner = excluded.owner",
        (
            delivery.id,
            delivery.name,
            delivery.topic,
            delivery.body,
            delivery.attempts,
            delivery.due,
            owner,
        ),
    )
    return cursor.rowcount


def _delete(db: sqlite_utils.Database, delivery_id: str) -> None:
    db.execute("DELETE FROM notification_outbox WHERE id = ?", (delivery_id,))


def _load(db: sqlite_utils.Database, owner: str) -> list[Delivery]:
    cursor = db.execute(
        "SELECT id, name, topic, body, attempts, due FROM notification_outbox "
        "WHERE owner = ? ORDER BY due",
        (owner,),
    )
    return _deliveries(cursor.fetchall())


def _deliveries(rows: list[tuple[str, str, str, bytes, int, float]]) -> list[Delivery]:
    return [
        Delivery(id=id_, name=name, topic=topic, body=bytes(body), attempts=attempts, due=due)
        for id_, name, topic, body, attempts, due in rows
    ]
