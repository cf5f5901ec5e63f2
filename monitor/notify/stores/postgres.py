"""OutboxStore on PostgreSQL (the notification_outbox table), shared by every replica.

Each row names the member key of the replica that sends it. Adoption is one UPDATE over
the dead owners' rows locked FOR UPDATE SKIP LOCKED: replicas adopting at once split the
rows between them and none waits on another; a row one of them holds is skipped, not
taken twice. An owner claims its row (one UPDATE naming itself) before every attempt, so
one taken for dead while paused finds the row gone to another and does not send it."""

from __future__ import annotations

from collections.abc import Collection

from monitor.notify.abc import Delivery, DeliveryTaken, OncePer
from registry.stores.pg import Connection, PgTransactor

MIGRATIONS = (
    "CREATE TABLE notification_outbox (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
    "topic TEXT NOT NULL, body BYTEA NOT NULL, attempts BIGINT NOT NULL, "
    "due DOUBLE PRECISION NOT NULL, owner TEXT NOT NULL)",
    "CREATE INDEX notification_outbox_owner ON notification_outbox (owner, due)",
    # What went out last per notification and subject: the same state once per interval.
    "CREATE TABLE notification_recent (name TEXT NOT NULL, subject TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, subject))",
    "CREATE INDEX notification_recent_at ON notification_recent (name, at)",
)

# Of two replicas adding the same state at once, the second waits on the first's row and
# then finds it recent: no row changed, so nothing is added.
_REMEMBER = (
    "INSERT INTO notification_recent (name, subject, fingerprint, at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (name, subject) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "at = excluded.at WHERE notification_recent.fingerprint <> excluded.fingerprint "
    "OR notification_recent.at <= %s"
)
_SAVE = (
    "INSERT INTO notification_outbox (id, name, topic, body, attempts, due, owner) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, topic = excluded.topic, "
    "body = excluded.body, attempts = excluded.attempts, due = excluded.due "
    "WHERE notification_outbox.owner = excluded.owner"
)
_ADOPT = (
    "UPDATE notification_outbox SET owner = %s WHERE id IN ("
    "SELECT id FROM notification_outbox WHERE owner = ANY(%s) FOR UPDATE SKIP LOCKED) "
    "RETURNING id, name, topic, body, attempts, due"
)


class PgOutboxStore:
    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("notify", MIGRATIONS)

    async def load(self, owner: str) -> list[Delivery]:
        def load(conn: Connection) -> list[Delivery]:
            cursor = conn.execute(
                "SELECT id, name, topic, body, attempts, due FROM notification_outbox "
                "WHERE owner = %s ORDER BY due",
                [owner],
            )
            return _deliveries(cursor.fetchall())

        return await self._db.read(load)

    async def add(self, delivery: Delivery, owner: str, *, once: OncePer) -> bool:
        since = once.now - once.interval

        def add(conn: Connection) -> bool:
            name = delivery.name
            # Subjects come from clients too: what is past its interval goes.
            conn.execute(
                "DELETE FROM notification_recent WHERE name = %s AND at <= %s", [name, since]
            )
            remembered = [name, once.subject, once.fingerprint, once.now, since]
            if not conn.execute(_REMEMBER, remembered).rowcount:
                return False
            row = (delivery.id, delivery.name, delivery.topic, delivery.body)
            conn.execute(_SAVE, [*row, delivery.attempts, delivery.due, owner])
            return True

        return await self._db.write(add)

    async def save(self, delivery: Delivery, owner: str) -> None:
        def save(conn: Connection) -> int:
            row = (delivery.id, delivery.name, delivery.topic, delivery.body)
            return conn.execute(_SAVE, [*row, delivery.attempts, delivery.due, owner]).rowcount

        if not await self._db.write(save):
            raise DeliveryTaken(delivery.id)

    async def claim(self, delivery: Delivery, owner: str) -> None:
        def claim(conn: Connection) -> int:
            return conn.execute(
                "UPDATE notification_outbox SET attempts = %s, due = %s "
                "WHERE id = %s AND owner = %s",
                [delivery.attempts, delivery.due, delivery.id, owner],
            ).rowcount

        if not await self._db.write(claim):
            raise DeliveryTaken(delivery.id)

    async def delete(self, delivery_id: str) -> None:
        def delete(conn: Connection) -> None:
            conn.execute("DELETE FROM notification_outbox WHERE id = %s", [delivery_id])

        await self._db.write(delete)

    async def owners(self) -> set[str]:
        def read(conn: Connection) -> set[str]:
            rows = conn.execute("SELECT DISTINCT owner FROM notification_outbox").fetchall()
            return {owner for (owner,) in rows}

        return await self._db.read(read)

    async def adopt(self, owner: str, dead_owners: Collection[str]) -> list[Delivery]:
        dead = [name for name in dead_owners if name != owner]
        if not dead:
            return []

        def adopt(conn: Connection) -> list[Delivery]:
            return _deliveries(conn.execute(_ADOPT, [owner, dead]).fetchall())

        return sorted(await self._db.write(adopt), key=lambda delivery: delivery.due)


def _deliveries(rows: list[tuple[str, str, str, bytes, int, float]]) -> list[Delivery]:
    return [
        Delivery(id=id_, name=name, topic=topic, body=bytes(body), attempts=attempts, due=due)
        for id_, name, topic, body, attempts, due in rows
    ]
