"""SLO accounting against hand-computed cases (the SRE workbook's among them)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from monitor.slo import SloLedger

START = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() // 60)  # a 30-day month
THIRTY_DAYS = 30 * 24 * 60


def feed(ledger: SloLedger, start: int, minutes: int, good: int, valid: int) -> int:
    for minute in range(start, start + minutes):
        ledger.record(minute, good, valid)
    return start + minutes


def test_no_data_is_no_sli_never_one_hundred_percent() -> None:
    ledger = SloLedger(0.999, THIRTY_DAYS)
    ledger.advance(START + 10)
    assert ledger.window("5m").sli is None
    assert ledger.burn_rate("1h") is None
    assert ledger.budget_remaining() is None
    assert ledger.month_report("2026-11").availability is None


def test_allowed_minutes_at_99_9_over_30_days_are_43_2() -> None:
    ledger = SloLedger(0.999, THIRTY_DAYS)
    assert ledger.month_report("2026-11").allowed_minutes == pytest.approx(43.2)
    feed(ledger, START, 60, 100, 100)
    ledger.advance(START + 61)
    assert ledger.budget_remaining_minutes() == pytest.approx(43.2)


def test_a_burn_rate_of_14_4_for_an_hour_spends_2_percent_of_the_budget() -> None:
    ledger = SloLedger(0.999, THIRTY_DAYS)
    minute = feed(ledger, START, THIRTY_DAYS - 60, 10_000, 10_000)  # 29d23h clean
    minute = feed(ledger, minute, 60, 10_000 - 144, 10_000)  # 1.44% errors = 14.4 x budget
    ledger.advance(minute)
    assert ledger.burn_rate("1h") == pytest.approx(14.4)
    assert ledger.burn_rate("5m") == pytest.approx(14.4)
    assert ledger.budget_remaining() == pytest.approx(0.98)
    assert ledger.budget_remaining_minutes() == pytest.approx(43.2 * 0.98)


def test_windows_hold_only_their_last_minutes() -> None:
    ledger = SloLedger(0.99, THIRTY_DAYS)
    minute = feed(ledger, START, 10, 0, 10)  # ten bad minutes
    minute = feed(ledger, minute, 5, 10, 10)  # then five good ones
    ledger.advance(minute)
    assert ledger.window("5m").sli == 1.0
    assert ledger.window("30m").sli == pytest.approx(5 / 15)
    assert ledger.period().valid == 150


def test_the_three_day_window_forgets_minute_by_minute() -> None:
    ledger = SloLedger(0.99, THIRTY_DAYS)
    minute = feed(ledger, START, 10, 0, 1)  # ten bad minutes, then three days of good ones
    minute = feed(ledger, minute, 3 * 1440, 1, 1)
    ledger.advance(minute)
    assert ledger.window("3d").error_ratio == 0.0
    assert ledger.window("3d").valid == 3 * 1440


def test_the_period_moves_by_the_hour() -> None:
    ledger = SloLedger(0.99, 24 * 60)  # a one-day SLO
    minute = feed(ledger, START, 60, 0, 10)  # one bad hour
    minute = feed(ledger, minute, 24 * 60, 10, 10)  # a good day after it
    ledger.advance(minute)
    assert ledger.period().error_ratio == 0.0  # the bad hour has left the period


def test_months_follow_the_time_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    ledger = SloLedger(0.999, THIRTY_DAYS, paris)
    # 2026-11-30 23:30 UTC is already December in Paris (UTC+1).
    late = int(datetime(2026, 11, 30, 22, 30, tzinfo=UTC).timestamp() // 60)
    feed(ledger, late, 60, 0, 1)  # 22:30-23:30 UTC: 23:30-00:30 in Paris
    ledger.advance(late + 61)
    november, december = ledger.month_report("2026-11"), ledger.month_report("2026-12")
    assert november.availability == 0.0 and december.availability == 0.0
    assert ledger.month_of(late + 29) == "2026-11" and ledger.month_of(late + 30) == "2026-12"
    assert december.allowed_minutes == pytest.approx(0.001 * 31 * 24 * 60)
    assert november.downtime_minutes == pytest.approx(30 * 24 * 60)  # all of it bad


def test_months_change_on_the_half_hour_where_the_offset_says_so() -> None:
    kolkata = SloLedger(0.999, THIRTY_DAYS, ZoneInfo("Asia/Kolkata"))  # UTC+5:30
    midnight = int(datetime(2026, 11, 30, 18, 30, tzinfo=UTC).timestamp() // 60)
    feed(kolkata, midnight - 20, 40, 1, 1)  # 20 minutes either side of local midnight
    kolkata.advance(midnight + 21)
    assert kolkata.month_sums("2026-11").valid == 20
    assert kolkata.month_sums("2026-12").valid == 20


def test_a_gap_longer_than_the_period_starts_afresh() -> None:
    ledger = SloLedger(0.99, 24 * 60)
    feed(ledger, START, 10, 0, 10)
    ledger.advance(START + 3 * 24 * 60)  # the daemon was down for three days
    assert ledger.window("3d").valid == 0
    assert ledger.period().valid == 0


def observable(ledger: SloLedger, months: tuple[str, ...]) -> dict[str, object]:
    windows = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
    return {
        "windows": {w: ledger.window(w) for w in windows},
        "period": ledger.period(),
        "months": {m: ledger.month_sums(m) for m in months},
    }


@pytest.mark.parametrize("period_days", [1, 7, 30])
def test_a_restart_restores_what_replaying_every_minute_would(period_days: int) -> None:
    import random

    rng = random.Random(period_days)
    period = period_days * 24 * 60
    start = START - 40 * 24 * 60  # from September into November: three months of rows
    rows, minute = [], start
    while minute < START + 5 * 24 * 60:
        valid = rng.choice((0, 6, 6, 6, 12))
        rows.append((minute, rng.randint(0, valid), valid))
        minute += rng.choice((1, 1, 1, 2, 7))  # now and then a quiet stretch
    now = minute + 3  # restart a few minutes after the last stored minute

    replayed = SloLedger(0.999, period)
    for at, good, valid in rows:
        replayed.record(at, good, valid)
    replayed.advance(now)

    restored = SloLedger(0.999, period)
    since = restored.history_start(now)
    restored.restore([r for r in rows if r[0] >= since], now)

    months = ("2026-10", "2026-11")  # the SLA reports: this month and the last
    assert observable(restored, months) == observable(replayed, months)
    # And it goes on from there exactly as the replayed one does.
    for ledger in (replayed, restored):
        feed(ledger, now, 90, 5, 6)
        ledger.advance(now + 91)
    assert observable(restored, months) == observable(replayed, months)
