"""Probe results on PostgreSQL (monitor.health.abc.ResultStore), shared by every replica.

The SQLite twin's three tables. Raw results and minutes go in by COPY (a flush of 10,000
is one stream, not 10,000 statements). Minutes and hours add up on conflict, so two
replicas flushing the same instance's minute during a handover, or one flushing it again
after a restart, sum their counts. `buckets` stays JSON text, merged by a function that
keeps the SQLite twin's key order (the old keys first, then the new ones)."""

from __future__ import annotations

from typing import Any

import orjson
from psycopg.rows import dict_row

from monitor.health.abc import RAW_RETENTION, DayRow, HourRow, MinuteRow, RawRow
from monitor.health.uptime import SPARK_HOURS, UPTIME_DAYS
from registry.stores.pg import Connection, PgTransactor

MIGRATIONS = (
    "CREATE TABLE probe_results (service TEXT NOT NULL, instance TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL, ok SMALLINT NOT NULL, response_time DOUBLE PRECISION NOT NULL, "
    "status INTEGER, error TEXT, failing TEXT, maintenance SMALLINT NOT NULL)",
    "CREATE INDEX probe_results_at ON probe_results (at)",
    "CREATE INDEX probe_results_instance ON probe_results (service, instance, at)",
    "CREATE TABLE probe_minutes (service TEXT NOT NULL, instance TEXT NOT NULL, "
    "minute BIGINT NOT NULL, count BIGINT NOT NULL, successes BIGINT NOT NULL, "
    "latency_sum DOUBLE PRECISION NOT NULL, buckets TEXT NOT NULL, maintenance BIGINT NOT NULL, "
    "PRIMARY KEY (service, instance, minute))",
    "CREATE TABLE service_hours (service TEXT NOT NULL, hour BIGINT NOT NULL, "
    "count BIGINT NOT NULL, successes BIGINT NOT NULL, latency_sum DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (service, hour))",
    # {"0.1": 5, "+Inf": 5} + {"0.5": 3, "+Inf": 3} = {"0.1": 5, "+Inf": 8, "0.5": 3}.
    # PL/pgSQL, not SQL: its plan is cached per connection (an SQL function's is made anew
    # for each upsert that calls it: 4 times slower at 10,000 merged minutes).
    "CREATE FUNCTION hms_merge_buckets(old TEXT, new TEXT) RETURNS TEXT "
    "LANGUAGE plpgsql IMMUTABLE STRICT AS $$ BEGIN RETURN ("
    "SELECT json_object_agg(key, total ORDER BY position)::text FROM ("
    "  SELECT key, sum(value::text::bigint) AS total, min(position) AS position FROM ("
    "    SELECT key, value, ordinality AS position "
    "    FROM json_each(old::json) WITH ORDINALITY"
    "    UNION ALL"
    "    SELECT key, value, 1000000 + ordinality FROM json_each(new::json) WITH ORDINALITY"
    "  ) AS both_sides GROUP BY key"
    ") AS merged); END $$",
    # Adds up the buckets of a minute given twice in one write (a row alone: no call).
    "CREATE AGGREGATE hms_sum_buckets(TEXT) (SFUNC = hms_merge_buckets, STYPE = TEXT)",
)

_COPY_RAW = (
    "COPY probe_results (service, instance, at, ok, response_time, status, error, failing, "
    "maintenance) FROM STDIN"
)
# Minutes arrive by COPY into a table of this session's and are merged in one statement:
# 10,000 minutes cost one round trip, not one statement each. GROUP BY first, as ON
# CONFLICT may touch a row once per statement; a key given twice is added up there.
_STAGE_MINUTES = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming_minutes (service TEXT, instance TEXT, "
    "minute BIGINT, count BIGINT, successes BIGINT, latency_sum DOUBLE PRECISION, "
    "buckets TEXT, maintenance BIGINT) ON COMMIT DELETE ROWS"
)
_COPY_MINUTES = (
    "COPY incoming_minutes (service, instance, minute, count, successes, latency_sum, "
    "buckets, maintenance) FROM STDIN"
)
_MERGE_MINUTES = (
    "INSERT INTO probe_minutes (service, instance, minute, count, successes, latency_sum, "
    "buckets, maintenance) "
    "SELECT service, instance, minute, sum(count), sum(successes), sum(latency_sum), "
    "hms_sum_buckets(buckets), sum(maintenance) FROM incoming_minutes "
    "GROUP BY service, instance, minute "
    "ON CONFLICT (service, instance, minute) DO UPDATE SET "
    "count = probe_minutes.count + excluded.count, "
    "successes = probe_minutes.successes + excluded.successes, "
    "latency_sum = probe_minutes.latency_sum + excluded.latency_sum, "
    "buckets = hms_merge_buckets(probe_minutes.buckets, excluded.buckets), "
    "maintenance = probe_minutes.maintenance + excluded.maintenance"
)
_UPSERT_HOUR = (
    "INSERT INTO service_hours (service, hour, count, successes, latency_sum) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (service, hour) DO UPDATE SET "
    "count = service_hours.count + excluded.count, "
    "successes = service_hours.successes + excluded.successes, "
    "latency_sum = service_hours.latency_sum + excluded.latency_sum"
)


class PgResultStore:
    def __init__(self, db: PgTransactor) -> None:
        self._db = db

    async def open(self, now: float) -> tuple[list[DayRow], list[HourRow]]:
        await self._db.migrate("health", MIGRATIONS)
        return await self._db.read(lambda conn: _read_uptime(conn, now))

    async def write(
        self, raw: list[RawRow], minutes: list[MinuteRow], hours: list[HourRow]
    ) -> None:
        await self._db.write(lambda conn: _write(conn, raw, minutes, hours))

    async def prune(self, now: float, retention: float) -> None:
        def prune(conn: Connection) -> None:
            conn.execute("DELETE FROM probe_results WHERE at < %s", [now - RAW_RETENTION])
            conn.execute(
                "DELETE FROM probe_minutes WHERE minute < %s", [int((now - retention) // 60)]
            )
            conn.execute(
                "DELETE FROM service_hours WHERE hour < %s", [int((now - retention) // 3600)]
            )

        await self._db.write(prune)

    async def minutes(self, service: str, since: float, until: float) -> list[dict[str, Any]]:
        def read(conn: Connection) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(
                    "SELECT instance, minute, count, successes, latency_sum, buckets, maintenance "
                    "FROM probe_minutes WHERE service = %s AND minute >= %s AND minute < %s "
                    "ORDER BY minute, instance",
                    [service, int(since // 60), int(until // 60)],
                )
                return cursor.fetchall()

        rows = await self._db.read(read)
        for row in rows:
            row["buckets"] = orjson.loads(row["buckets"])
        return rows

    async def raw(self, service: str, instance: str) -> list[dict[str, Any]]:
        def read(conn: Connection) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(
                    "SELECT at, ok, response_time, status, error, failing, maintenance "
                    "FROM probe_results WHERE service = %s AND instance = %s ORDER BY at",
                    [service, instance],
                )
                return cursor.fetchall()

        return await self._db.read(read)


def _read_uptime(conn: Connection, now: float) -> tuple[list[DayRow], list[HourRow]]:
    """Whole days for the bars, single hours for the last day's latency sparkline."""
    hour = int(now // 3600)
    # sum() of BIGINT is NUMERIC on PostgreSQL: cast back, the rows are ints on SQLite.
    days = conn.execute(
        "SELECT service, hour / 24, sum(count)::bigint, sum(successes)::bigint "
        "FROM service_hours WHERE hour >= %s GROUP BY service, hour / 24",
        [(int(now // 86400) - UPTIME_DAYS) * 24],
    ).fetchall()
    hours = conn.execute(
        "SELECT service, hour, count, successes, latency_sum FROM service_hours WHERE hour > %s",
        [hour - SPARK_HOURS],
    ).fetchall()
    return days, hours


def _write(
    conn: Connection, raw: list[RawRow], minutes: list[MinuteRow], hours: list[HourRow]
) -> None:
    with conn.cursor() as cursor:
        if raw:
            with cursor.copy(_COPY_RAW) as copy:
                for row in raw:
                    copy.write_row(row)
        if minutes:
            cursor.execute(_STAGE_MINUTES)
            with cursor.copy(_COPY_MINUTES) as copy:
                for minute in minutes:
                    copy.write_row(minute)
            cursor.execute(_MERGE_MINUTES)
            # Emptied now, not at COMMIT: another flush may share this transaction.
            cursor.execute("TRUNCATE incoming_minutes")
        if hours:
            cursor.executemany(_UPSERT_HOUR, hours)
