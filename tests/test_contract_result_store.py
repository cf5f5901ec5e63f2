"""The ResultStore contract (monitor.health.abc), run against every implementation through
the Protocol alone: rows read back, minutes and hours add up on conflict, prune keeps its
boundaries, the rollup restores, a broken storage refuses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from monitor.health import RAW_RETENTION, ResultStore, SqliteResultStore
from monitor.health.abc import HourRow, MinuteRow, RawRow
from monitor.health.stores.postgres import PgResultStore
from registry import StoreUnavailable

from .contracts import Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[ResultStore]] = {
    "sqlite": sqlite_factory(SqliteResultStore),
    "postgres": postgres_factory(PgResultStore),
}


@pytest.fixture
def factory(backend: str) -> Factory[ResultStore]:
    return factory_for(FACTORIES, backend)


NOW = 1_800_000_000.0  # 08:00 UTC: the hour before is the same day, 30 hours back is not
MINUTE = int(NOW // 60)
HOUR = int(NOW // 3600)
TODAY = HOUR // 24
DAY = 86400.0


def raw(
    at: float,
    instance: str = "p1",
    *,
    ok: int = 1,
    status: int | None = 200,
    error: str | None = None,
    failing: str | None = None,
    maintenance: int = 0,
) -> RawRow:
    return ("pay", instance, at, ok, 0.02, status, error, failing, maintenance)


def minute(minute: int, instance: str = "p1", count: int = 6, le: str = "0.1") -> MinuteRow:
    """`count` probes, one failed, one more in maintenance; the successes all under `le`."""
    cumulative = json.dumps({le: count - 1, "+Inf": count - 1})
    return ("pay", instance, minute, count, count - 1, 0.05 * count, cumulative, 1)


def hour(hour: int, count: int = 60, service: str = "pay") -> HourRow:
    return (service, hour, count, count - 2, 1.5)


async def test_a_fresh_store_opens_with_an_empty_rollup(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        assert await backing.store.open(NOW) == ([], [])
        assert await backing.store.open(NOW) == ([], [])  # idempotent
        assert await backing.store.minutes("pay", 0, NOW) == []
        assert await backing.store.raw("pay", "p1") == []


async def test_raw_results_read_back_in_time_order(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    failed = raw(NOW - 5, ok=0, status=None, error="connection refused", failing='["[CONNECTED]"]')
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.store.write([raw(NOW - 1), failed], [], [])
        await backing.store.write([raw(NOW - 3, maintenance=1), raw(NOW - 2, "p2")], [], [])
        rows = await backing.store.raw("pay", "p1")
    assert [row["at"] for row in rows] == [NOW - 5, NOW - 3, NOW - 1]
    assert rows[0] == {
        "at": NOW - 5,
        "ok": 0,
        "response_time": 0.02,
        "status": None,
        "error": "connection refused",
        "failing": '["[CONNECTED]"]',
        "maintenance": 0,
    }
    assert rows[1]["maintenance"] == 1


async def test_minutes_read_back_by_minute_then_instance_within_the_window(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        rows = [
            minute(MINUTE - 1, "p2"),
            minute(MINUTE - 1, "p1"),
            minute(MINUTE - 2),
            minute(MINUTE),
        ]
        await backing.store.write([], rows, [])
        read = await backing.store.minutes("pay", NOW - 120, NOW)  # [since, until)
        other = await backing.store.minutes("ship", 0, NOW + 60)
    assert [(row["minute"], row["instance"]) for row in read] == [
        (MINUTE - 2, "p1"),
        (MINUTE - 1, "p1"),
        (MINUTE - 1, "p2"),
    ]
    assert read[0] == {
        "instance": "p1",
        "minute": MINUTE - 2,
        "count": 6,
        "successes": 5,
        "latency_sum": pytest.approx(0.3),
        "buckets": {"0.1": 5, "+Inf": 5},
        "maintenance": 1,
    }
    assert other == []


async def test_a_minute_written_twice_is_added_up(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.store.write([], [minute(MINUTE - 1, count=6)], [hour(HOUR, 30)])
        await backing.store.write([], [minute(MINUTE - 1, count=4, le="0.5")], [hour(HOUR, 20)])
        (row,) = await backing.store.minutes("pay", 0, NOW)
        _, hours = await backing.store.open(NOW)
    assert (row["count"], row["successes"], row["maintenance"]) == (10, 8, 2)
    assert row["latency_sum"] == pytest.approx(0.5)
    assert row["buckets"] == {"0.1": 5, "0.5": 3, "+Inf": 8}
    assert hours == [("pay", HOUR, 50, 46, 3.0)]


async def test_a_minute_given_twice_in_one_write_is_added_up(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        twice = [minute(MINUTE - 1, count=6), minute(MINUTE - 1, count=4, le="0.5")]
        await backing.store.write([], twice, [hour(HOUR, 30), hour(HOUR, 20)])
        (row,) = await backing.store.minutes("pay", 0, NOW)
        _, hours = await backing.store.open(NOW)
    assert (row["count"], row["successes"], row["maintenance"]) == (10, 8, 2)
    assert row["buckets"] == {"0.1": 5, "0.5": 3, "+Inf": 8}
    assert hours == [("pay", HOUR, 50, 46, 3.0)]


async def test_writes_made_at_once_are_each_counted_once(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    """Writes queued together may share a transaction (group commit): neither is counted
    twice nor lost."""
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await asyncio.gather(
            *(backing.store.write([raw(NOW - i)], [minute(MINUTE - 1)], []) for i in range(1, 4))
        )
        (row,) = await backing.store.minutes("pay", 0, NOW)
        assert row["count"] == 18
        assert len(await backing.store.raw("pay", "p1")) == 3


async def test_open_returns_whole_days_and_the_last_hours(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    rows = [hour(HOUR), hour(HOUR - 1), hour(HOUR - 30), hour(HOUR, service="ship")]
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.store.write([], [], rows)
        days, hours = await backing.store.open(NOW)
    assert sorted(days) == [
        ("pay", TODAY - 1, 60, 58),
        ("pay", TODAY, 120, 116),
        ("ship", TODAY, 60, 58),
    ]
    assert sorted(hours) == sorted([hour(HOUR), hour(HOUR - 1), hour(HOUR, service="ship")])


async def test_prune_keeps_raw_two_days_and_minutes_and_hours_the_retention(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    retention = 7 * DAY
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.store.write(
            [raw(NOW - RAW_RETENTION - 1), raw(NOW - RAW_RETENTION), raw(NOW - 60)],
            [minute(int((NOW - retention) // 60) - 1), minute(int((NOW - retention) // 60))],
            [hour(int((NOW - retention) // 3600) - 1), hour(int((NOW - retention) // 3600))],
        )
        await backing.store.prune(NOW, retention)
        kept_raw = await backing.store.raw("pay", "p1")
        kept_minutes = await backing.store.minutes("pay", 0, NOW)
        days, _ = await backing.store.open(NOW - retention + DAY)  # the days the hours fall in
    assert [row["at"] for row in kept_raw] == [NOW - RAW_RETENTION, NOW - 60]
    assert [row["minute"] for row in kept_minutes] == [int((NOW - retention) // 60)]
    assert sum(count for _, _, count, _ in days) == 60  # one of the two hours is left


async def test_a_reopened_store_reads_back_what_was_written(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.store.write([raw(NOW - 1)], [minute(MINUTE - 1)], [hour(HOUR)])
    async with factory(tmp_path) as backing:
        days, hours = await backing.store.open(NOW)
        assert hours == [hour(HOUR)]
        assert days == [("pay", TODAY, 60, 58)]
        assert [row["at"] for row in await backing.store.raw("pay", "p1")] == [NOW - 1]
        assert len(await backing.store.minutes("pay", 0, NOW)) == 1


async def test_writes_to_a_broken_storage_raise_store_unavailable(
    factory: Factory[ResultStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.open(NOW)
        await backing.break_storage()
        with pytest.raises(StoreUnavailable):
            await backing.store.write([raw(NOW - 1)], [minute(MINUTE - 1)], [hour(HOUR)])
        with pytest.raises(StoreUnavailable):
            await backing.store.prune(NOW, DAY)
