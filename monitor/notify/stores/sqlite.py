"""OutboxStore on the daemon's SQLite database (the notification_outbox table)."""

from __future__ import annotations

import sqlite_utils

from monitor.notify.abc import Delivery
from registry import Transactor


class SqliteOutboxStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.write(_create_table)

    async def load(self) -> list[Delivery]:
        return await self._db.read(_load)

    async def save(self, delivery: Delivery) -> None:
        await self._db.write(lambda db: _save(db, delivery))

    async def delete(self, delivery_id: str) -> None:
        await self._db.write(lambda db: _delete(db, delivery_id))


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS notification_outbox (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "topic TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, due REAL NOT NULL)"
    )


def _save(db: sqlite_utils.Database, delivery: Delivery) -> None:
    db.execute(
        "INSERT OR REPLACE INTO notification_outbox (id, name, topic, body, attempts, due) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            delivery.id,
            delivery.name,
            delivery.topic,
            delivery.body,
            delivery.attempts,
            delivery.due,
        ),
    )


def _delete(db: sqlite_utils.Database, delivery_id: str) -> None:
    db.execute("DELETE FROM notification_outbox WHERE id = ?", (delivery_id,))


def _load(db: sqlite_utils.Database) -> list[Delivery]:
    cursor = db.execute(
        "SELECT id, name, topic, body, attempts, due FROM notification_outbox ORDER BY due"
    )
    return [
        Delivery(id=id_, name=name, topic=topic, body=body, attempts=attempts, due=due)
        for id_, name, topic, body, attempts, due in cursor.fetchall()
    ]
