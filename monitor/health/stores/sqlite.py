"""Probe results in the daemon's SQLite file (monitor.health.abc.ResultStore).

Three tables: `probe_results` (raw, two days), `probe_minutes` (per instance and minute,
what SLOs read) and `service_hours` (per service and hour, what the uptime bars restore
from). Every write is one transaction of executemany statements, whatever its size."""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from monitor.health.abc import RAW_RETENTION, DayRow, HourRow, MinuteRow, RawRow
from monitor.health.uptime import SPARK_HOURS, UPTIME_DAYS
from registry import Transactor

RAW = "probe_results"
MINUTES = "probe_minutes"
HOURS = "service_hours"  # per service and hour: what the status page's uptime bars show


class SqliteResultStore:
    def __init__(self, db: Transactor) -> None:
        self._db = db

    async def open(self, now: float) -> tuple[list[DayRow], list[HourRow]]:
        await self._db.write(_create_tables)
        return await self._db.read(lambda db: _read_uptime(db, now))

    async def write(
        self, raw: list[RawRow], minutes: list[MinuteRow], hours: list[HourRow]
    ) -> None:
        await self._db.write(lambda db: _write(db, raw, minutes, hours))

    async def prune(self, now: float, retention: float) -> None:
        def prune(db: sqlite_utils.Database) -> None:
            db.execute("DELETE FROM probe_results WHERE at < ?", [now - RAW_RETENTION])
            db.execute("DELETE FROM probe_minutes WHERE minute < ?", [int((now - retention) // 60)])
            db.execute("DELETE FROM service_hours WHERE hour < ?", [int((now - retention) // 3600)])

        await self._db.write(prune)

    async def minutes(self, service: str, since: float, until: float) -> list[dict[str, Any]]:
        def read(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            return list(
                db.query(
                    "SELECT instance, minute, count, successes, latency_sum, buckets, maintenance "
                    "FROM probe_minutes WHERE service = ? AND minute >= ? AND minute < ? "
                    "ORDER BY minute, instance",
                    [service, int(since // 60), int(until // 60)],
                )
            )

        rows = await self._db.read(read)
        for row in rows:
            row["buckets"] = json.loads(row["buckets"])
        return rows

    async def raw(self, service: str, instance: str) -> list[dict[str, Any]]:
        def read(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            return list(
                db.query(
                    "SELECT at, ok, response_time, status, error, failing, maintenance "
                    "FROM probe_results WHERE service = ? AND instance = ? ORDER BY at",
                    [service, instance],
                )
            )

        return await self._db.read(read)


def _create_tables(db: sqlite_utils.Database) -> None:
    if not db[RAW].exists():
        db[RAW].create(  # type: ignore[union-attr]
            {
                "service": str,
                "instance": str,
                "at": float,
                "ok": int,
                "response_time": float,
                "status": int,
                "error": str,
                "failing": str,
                "maintenance": int,
            }
        )
        db[RAW].create_index(["at"])  # type: ignore[union-attr]
        db[RAW].create_index(["service", "instance", "at"])  # type: ignore[union-attr]
    if not db[MINUTES].exists():
        db[MINUTES].create(  # type: ignore[union-attr]
            {
                "service": str,
                "instance": str,
                "minute": int,
                "count": int,
                "successes": int,
                "latency_sum": float,
                "buckets": str,
                "maintenance": int,
            },
            pk=("service", "instance", "minute"),
        )
    if not db[HOURS].exists():
        db[HOURS].create(  # type: ignore[union-attr]
            {"service": str, "hour": int, "count": int, "successes": int, "latency_sum": float},
            pk=("service", "hour"),
        )
        # Databases from before the rollup: fill it once from the minutes they kept.
        db.execute(
            "INSERT INTO service_hours (service, hour, count, successes, latency_sum) "
            "SELECT service, minute / 60, sum(count), sum(successes), sum(latency_sum) "
            "FROM probe_minutes GROUP BY service, minute / 60"
        )


def _merge_buckets(old: str, new: str) -> str:
    merged = json.loads(old)
    for label, count in json.loads(new).items():
        merged[label] = merged.get(label, 0) + count
    return json.dumps(merged)


def _read_uptime(db: sqlite_utils.Database, now: float) -> tuple[list[DayRow], list[HourRow]]:
    """Whole days for the bars, single hours for the last day's latency sparkline."""
    hour = int(now // 3600)
    days = db.execute(
        "SELECT service, hour / 24, sum(count), sum(successes) FROM service_hours "
        "WHERE hour >= ? GROUP BY service, hour / 24",
        [(int(now // 86400) - UPTIME_DAYS) * 24],
    ).fetchall()
    hours = db.execute(
        "SELECT service, hour, count, successes, latency_sum FROM service_hours WHERE hour > ?",
        [hour - SPARK_HOURS],
    ).fetchall()
    return days, hours


def _write(
    db: sqlite_utils.Database,
    raw: list[RawRow],
    rows: list[MinuteRow],
    hours: list[HourRow],
) -> None:
    db.conn.executemany(
        "INSERT INTO probe_results (service, instance, at, ok, response_time, status, error, "
        "failing, maintenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        raw,
    )
    # A minute written at shutdown may be written again after the restart: add them up.
    db.conn.create_function("hms_merge_buckets", 2, _merge_buckets, deterministic=True)
    db.conn.executemany(
        "INSERT INTO probe_minutes (service, instance, minute, count, successes, latency_sum, "
        "buckets, maintenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(service, instance, minute) DO UPDATE SET "
        "count = count + excluded.count, successes = successes + excluded.successes, "
        "latency_sum = latency_sum + excluded.latency_sum, "
        "buckets = hms_merge_buckets(buckets, excluded.buckets), "
        "maintenance = maintenance + excluded.maintenance",
        rows,
    )
    db.conn.executemany(
        "INSERT INTO service_hours (service, hour, count, successes, latency_sum) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(service, hour) DO UPDATE SET "
        "count = count + excluded.count, successes = successes + excluded.successes, "
        "latency_sum = latency_sum + excluded.latency_sum",
        hours,
    )
