"""SloMinuteStore on PostgreSQL (the slo_minutes table), shared by every replica: two
replicas adding to the same minute sum their counts, as one replica adding twice does."""

from __future__ import annotations

from registry.stores.pg import Connection, PgTransactor

MIGRATIONS = (
    "CREATE TABLE slo_minutes (service TEXT NOT NULL, slo TEXT NOT NULL, minute BIGINT NOT NULL, "
    "good BIGINT NOT NULL, valid BIGINT NOT NULL, PRIMARY KEY (service, slo, minute))",
    "CREATE INDEX slo_minutes_minute ON slo_minutes (minute)",
)

_UPSERT = (
    "INSERT INTO slo_minutes (service, slo, minute, good, valid) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (service, slo, minute) DO UPDATE SET "
    "good = slo_minutes.good + excluded.good, valid = slo_minutes.valid + excluded.valid"
)


class PgSloMinuteStore:
    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def create_tables(self) -> None:
        await self._db.migrate("slo", MIGRATIONS)

    async def minutes(self, service: str, slo: str, since: int) -> list[tuple[int, int, int]]:
        def read(conn: Connection) -> list[tuple[int, int, int]]:
            return conn.execute(
                "SELECT minute, good, valid FROM slo_minutes "
                "WHERE service = %s AND slo = %s AND minute >= %s",
                [service, slo, since],
            ).fetchall()

        return await self._db.read(read)

    async def add(self, rows: list[tuple[str, str, int, int, int]]) -> None:
        def write(conn: Connection) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(_UPSERT, rows)

        await self._db.write(write)

    async def prune(self, before_minute: int) -> None:
        def prune(conn: Connection) -> None:
            conn.execute("DELETE FROM slo_minutes WHERE minute < %s", [before_minute])

        await self._db.write(prune)
