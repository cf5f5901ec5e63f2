"""Probe results on disk: raw results for two days, per-minute aggregates for the SLOs.

Nothing touches SQLite per probe. Results collect in memory; a flush job
writes the raw ones with one executemany and each instance's minute once
the minute is over (the current minute too at shutdown, merged on conflict),
so 10,000 probes a second cost a few statements a second.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from monitor.health.uptime import SPARK_HOURS, UPTIME_DAYS, DayRow, HourRow, Uptime
from monitor.probing.prober import ProbeResult
from registry import Transactor

RAW = "probe_results"
MINUTES = "probe_minutes"
HOURS = "service_hours"  # per service and hour: what the status page's uptime bars show
RAW_RETENTION = 2 * 86400.0
MAX_UNFLUSHED_RAW = 200_000  # ~20 s of 10k instances at 1 s; minutes are never dropped

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Minute:
    """One instance's probes within one minute (maintenance-time probes counted apart)."""

    count: int = 0
    successes: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=list)  # per boundary, not cumulative; last: +Inf
    maintenance: int = 0


@functools.lru_cache(maxsize=1024)
def _failing_json(failing: tuple[str, ...]) -> str:
    """An outage fails thousands of probes the same way: encode each way once."""
    return json.dumps(list(failing))


def bucket_index(boundaries: tuple[float, ...], value: float) -> int:
    """The bucket `value` falls in: the first boundary >= value (`le`), +Inf last."""
    return bisect.bisect_left(boundaries, value)


def bucket_label(boundary: float) -> str:
    """`le` as prometheus_client renders it (0.3 -> "0.3", 1 -> "1.0", +Inf)."""
    return "+Inf" if math.isinf(boundary) else repr(float(boundary))


class ResultStore:
    def __init__(self, db: Transactor, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._db = db
        self.uptime = Uptime()
        self.boundaries = (*sorted(set(buckets)), math.inf)
        self._raw: list[tuple[Any, ...]] = []
        self._minutes: dict[tuple[str, str, int], Minute] = {}

    async def create_tables(self, now: float) -> None:
        await self._db.write(_create_tables)
        days, hours = await self._db.read(lambda db: _read_uptime(db, now))
        self.uptime.restore(days, hours, now)

    def add(
        self,
        service: str,
        instance: str,
        result: ProbeResult,
        *,
        ok: bool,
        failing: Sequence[str] = (),
        maintenance: bool = False,
    ) -> None:
        self._raw.append(
            (
                service,
                instance,
                result.at,
                int(ok),
                result.response_time,
                result.status,
                result.error,
                _failing_json(tuple(failing)) if failing else None,
                int(maintenance),
            )
        )
        key = (service, instance, int(result.at // 60))
        minute = self._minutes.get(key)
        if minute is None:
            minute = self._minutes[key] = Minute(buckets=[0] * len(self.boundaries))
        if maintenance:  # excluded from both good and valid events
            minute.maintenance += 1
            return
        minute.count += 1
        minute.successes += ok
        if ok:  # latency SLIs count successful probes under a threshold
            minute.latency_sum += result.response_time
            minute.buckets[bucket_index(self.boundaries, result.response_time)] += 1

    async def flush(self, now: float, *, everything: bool = False) -> int:
        """Write buffered raw results and finished minutes (all minutes with `everything`)."""
        raw, self._raw = self._raw, []
        current = int(now // 60)
        done = {k: m for k, m in self._minutes.items() if everything or k[2] < current}
        for key in done:
            del self._minutes[key]
        if not raw and not done:
            return 0
        rows = [
            (*key, m.count, m.successes, m.latency_sum, self._encode(m.buckets), m.maintenance)
            for key, m in done.items()
        ]
        hours = _by_hour(done)
        try:
            await self._db.write(lambda db: _write(db, raw, rows, hours))
        except Exception:
            self._requeue(raw, done)
            raise
        self.uptime.add(hours, now)
        return len(raw)

    def _requeue(self, raw: list[tuple[Any, ...]], done: dict[Any, Any]) -> None:
        """Keep what a failed flush did not store (storage full or read-only) for the next
        one. Minutes are small and all kept; raw results are capped, oldest dropped first."""
        for key, minute in done.items():
            self._minutes.setdefault(key, minute)
        self._raw = raw + self._raw
        dropped = len(self._raw) - MAX_UNFLUSHED_RAW
        if dropped > 0:
            del self._raw[:dropped]
            log.warning("storage failing: dropped %d raw probe results (minutes kept)", dropped)

    async def prune(self, now: float, retention: float) -> None:
        def prune(db: sqlite_utils.Database) -> None:
            db.execute("DELETE FROM probe_results WHERE at < ?", [now - RAW_RETENTION])
            db.execute("DELETE FROM probe_minutes WHERE minute < ?", [int((now - retention) // 60)])
            db.execute("DELETE FROM service_hours WHERE hour < ?", [int((now - retention) // 3600)])

        await self._db.write(prune)

    async def minutes(self, service: str, since: float, until: float) -> list[dict[str, Any]]:
        """Stored per-minute aggregates of a service, oldest first."""

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

    def _encode(self, counts: list[int]) -> str:
        """Cumulative counts keyed by `le`, as Prometheus buckets are."""
        total, cumulative = 0, {}
        for boundary, count in zip(self.boundaries, counts, strict=True):
            total += count
            cumulative[bucket_label(boundary)] = total
        return json.dumps(cumulative)


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


def _by_hour(minutes: dict[tuple[str, str, int], Minute]) -> list[HourRow]:
    sums: dict[tuple[str, int], list[float]] = {}
    for (service, _, minute), m in minutes.items():
        total = sums.setdefault((service, minute // 60), [0, 0, 0.0])
        total[0] += m.count
        total[1] += m.successes
        total[2] += m.latency_sum
    return [(s, h, int(c), int(ok), lat) for (s, h), (c, ok, lat) in sums.items()]


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
    raw: list[tuple[Any, ...]],
    rows: list[tuple[Any, ...]],
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
