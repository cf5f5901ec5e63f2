"""SLO accounting in the daemon: SLIs over rolling windows, error budgets, burn rates, monthly SLAs.

One ledger per SLO counts good and valid events per minute (maintenance-time
probes are neither). Cost stays flat as history grows: every window keeps a
running sum, updated when a minute closes (add the minute that enters,
subtract the one that leaves), so an evaluation reads sums instead of
scanning a month of rows. Windows up to 3 days move minute by minute; the
SLO's period (30 days, say) moves hour by hour, from an hourly ring.

No data is no data: an SLI over a window without valid events is None,
never 100% and never NaN.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlite_utils
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry import Transactor, format_duration
from scheduler import EventBus

from .config import Service, Slo
from .rules import TIERS

WINDOWS = {"5m": 5, "30m": 30, "1h": 60, "2h": 120, "6h": 360, "1d": 1440, "3d": 4320}
MINUTE_RING = 4320  # the longest minute-exact window
HOUR = 60


@dataclass(frozen=True, slots=True)
class Sums:
    good: int = 0
    valid: int = 0

    @property
    def error_ratio(self) -> float | None:
        return None if self.valid == 0 else 1 - self.good / self.valid

    @property
    def sli(self) -> float | None:
        return None if self.valid == 0 else self.good / self.valid


@dataclass(frozen=True, slots=True)
class MonthReport:
    month: str  # 2026-11
    availability: float | None  # ratio; None without data
    downtime_minutes: float | None
    allowed_minutes: float

    def to_json(self) -> dict[str, object]:
        return {
            "month": self.month,
            "availability_percent": None
            if self.availability is None
            else round(self.availability * 100, 6),
            "downtime_minutes": None
            if self.downtime_minutes is None
            else round(self.downtime_minutes, 3),
            "allowed_minutes": round(self.allowed_minutes, 3),
        }


@dataclass(slots=True)
class _Window:
    minutes: int
    good: int = 0
    valid: int = 0


@dataclass(slots=True)
class SloLedger:
    """Good and valid events of one SLO, minute by minute, with running window sums."""

    objective: float  # ratio, e.g. 0.999
    period_minutes: int
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    _current_minute: int = -1
    _good: int = 0
    _valid: int = 0
    _minute_good: array[int] = field(default_factory=lambda: array("q", bytes(8 * MINUTE_RING)))
    _minute_valid: array[int] = field(default_factory=lambda: array("q", bytes(8 * MINUTE_RING)))
    _windows: dict[str, _Window] = field(default_factory=dict)
    _hour_good: array[int] = field(default_factory=lambda: array("q"))
    _hour_valid: array[int] = field(default_factory=lambda: array("q"))
    _period: _Window = field(default_factory=lambda: _Window(0))
    _hour_open: tuple[int, int] = (0, 0)  # good, valid of the hour being filled
    _months: dict[str, Sums] = field(default_factory=dict)
    closed: list[tuple[int, int, int]] = field(default_factory=list)  # to persist
    keep_closed: bool = False

    def __post_init__(self) -> None:
        hours = max(1, -(-self.period_minutes // HOUR))
        self._hour_good = array("q", bytes(8 * hours))
        self._hour_valid = array("q", bytes(8 * hours))
        self._windows = {name: _Window(minutes) for name, minutes in WINDOWS.items()}
        self._period = _Window(self.period_minutes)

    @property
    def budget(self) -> float:
        return 1 - self.objective

    def record(self, minute: int, good: int, valid: int) -> None:
        """Count events of `minute` (epoch minutes). Minutes arrive in order; a late one
        for a closed minute is added to the current one rather than rewriting history."""
        if minute > self._current_minute:
            self.advance(minute)
        self._good += good
        self._valid += valid

    def advance(self, minute: int) -> None:
        """Close every minute before `minute`."""
        if self._current_minute < 0:
            self._current_minute = minute
            return
        while self._current_minute < minute:
            self._close(self._current_minute, self._good, self._valid)
            self._good = self._valid = 0
            self._current_minute += 1
            if minute - self._current_minute > self.period_minutes:
                # Down for longer than the period: nothing left to carry, jump ahead.
                self._reset_to(minute)
                return

    def window(self, name: str) -> Sums:
        w = self._windows[name]
        return Sums(w.good, w.valid)

    def period(self) -> Sums:
        return Sums(self._period.good, self._period.valid)

    def budget_remaining(self) -> float | None:
        """1 - (period error ratio / budget): 1 untouched, 0 spent, below 0 overspent."""
        error = self.period().error_ratio
        return None if error is None else 1 - error / self.budget

    def budget_remaining_minutes(self) -> float | None:
        remaining = self.budget_remaining()
        return None if remaining is None else remaining * self.budget * self.period_minutes

    def burn_rate(self, name: str) -> float | None:
        error = self.window(name).error_ratio
        return None if error is None else error / self.budget

    def month_report(self, month: str) -> MonthReport:
        sums = self._months.get(month, Sums())
        year, number = (int(part) for part in month.split("-"))
        following = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=self.zone)
        first = datetime(year, number, 1, tzinfo=self.zone)
        minutes = (following - first).total_seconds() / 60
        availability = sums.sli
        downtime = None if availability is None else (1 - availability) * minutes
        return MonthReport(month, availability, downtime, self.budget * minutes)

    def month_of(self, minute: int) -> str:
        return datetime.fromtimestamp(minute * 60, UTC).astimezone(self.zone).strftime("%Y-%m")

    def _close(self, minute: int, good: int, valid: int) -> None:
        slot = minute % MINUTE_RING
        for w in self._windows.values():
            # The minute leaving a window of w.minutes is w.minutes back; for 3 days that
            # is exactly the minute this slot still holds.
            leaving = (minute - w.minutes) % MINUTE_RING
            w.good += good - self._minute_good[leaving]
            w.valid += valid - self._minute_valid[leaving]
        self._minute_good[slot], self._minute_valid[slot] = good, valid
        if self.keep_closed and valid:
            self.closed.append((minute, good, valid))
        if valid:
            month = self.month_of(minute)
            before = self._months.get(month, Sums())
            self._months[month] = Sums(before.good + good, before.valid + valid)
            if len(self._months) > 3:
                del self._months[min(self._months)]
        self._close_into_hour(minute, good, valid)

    def _close_into_hour(self, minute: int, good: int, valid: int) -> None:
        hour_good, hour_valid = self._hour_open
        hour_good, hour_valid = hour_good + good, hour_valid + valid
        self._period.good += good
        self._period.valid += valid
        if (minute + 1) % HOUR:
            self._hour_open = (hour_good, hour_valid)
            return
        slot = (minute // HOUR) % len(self._hour_good)
        # The hour leaving the period window is the one this slot held.
        self._period.good -= self._hour_good[slot]
        self._period.valid -= self._hour_valid[slot]
        self._hour_good[slot], self._hour_valid[slot] = hour_good, hour_valid
        self._hour_open = (0, 0)

    def _reset_to(self, minute: int) -> None:
        """Forget every window (all of it is older than the period); keep the months."""
        for ring in (self._minute_good, self._minute_valid, self._hour_good, self._hour_valid):
            for index in range(len(ring)):
                ring[index] = 0
        for w in (*self._windows.values(), self._period):
            w.good = w.valid = 0
        self._hour_open = (0, 0)
        self._good = self._valid = 0
        self._current_minute = minute


def period_name(minutes: int) -> str:
    return format_duration(minutes * 60)


@dataclass(slots=True)
class _Tracked:
    service: str
    slo: Slo
    ledger: SloLedger
    threshold: float | None  # latency SLO: seconds
    firing: set[str] = field(default_factory=set)  # burn tiers currently over
    exhausted: bool = False

    def months(self, now: float) -> tuple[str, str]:
        """This calendar month and the previous one, in the SLO's time zone."""
        current = self.ledger.month_of(int(now // 60))
        year, month = (int(x) for x in current.split("-"))
        return current, f"{year - 1}-12" if month == 1 else f"{year}-{month - 1:02d}"


class SloBook:
    """Every configured SLO's ledger, fed by probe results, evaluated by a job."""

    def __init__(
        self, services: Iterable[Service], *, bus: EventBus, timezone: str = "UTC"
    ) -> None:
        self._bus = bus
        zone = ZoneInfo(timezone)
        self._tracked: dict[str, list[_Tracked]] = {}
        for service in services:
            for slo in service.slos:
                if slo.sli is not None:
                    continue  # raw SLIs live in Prometheus: rules only
                minutes = int(slo.period.total_seconds() // 60)
                ledger = SloLedger(slo.objective / 100, minutes, zone, keep_closed=True)
                threshold = slo.latency_threshold.total_seconds() if slo.latency_threshold else None
                self._tracked.setdefault(service.name, []).append(
                    _Tracked(service.name, slo, ledger, threshold)
                )

    def __bool__(self) -> bool:
        return bool(self._tracked)

    def record(
        self, service: str, at: float, *, ok: bool, response_time: float, maintenance: bool
    ) -> None:
        tracked = self._tracked.get(service)
        if not tracked:
            return
        minute = int(at // 60)
        for entry in tracked:
            if maintenance:  # excluded from both good and valid
                entry.ledger.advance(minute)
                continue
            good = ok and (entry.threshold is None or response_time <= entry.threshold)
            entry.ledger.record(minute, int(good), 1)

    def evaluate(self, now: float) -> None:
        """Close minutes up to now and publish burn and exhaustion transitions."""
        minute = int(now // 60)
        for entry in self._all():
            entry.ledger.advance(minute)
            self._publish_transitions(entry)

    def statuses(self, service: str, now: float) -> list[dict[str, object]] | None:
        if service not in self._tracked:
            return None
        self.evaluate(now)
        return [self._status(entry, now) for entry in self._tracked[service]]

    def evaluated(self, now: float) -> list[_Tracked]:
        self.evaluate(now)
        return self._all()

    async def load(self, db: Transactor) -> None:
        """Replay persisted minutes, oldest first, so windows and months survive a restart."""
        await db.write(_create_table)
        for entry in self._all():
            rows = await db.read(_reader(entry.service, entry.slo.name))
            entry.ledger.keep_closed = False  # replayed minutes are stored already
            for minute, good, valid in rows:
                entry.ledger.record(minute, good, valid)
            entry.ledger.keep_closed = True

    async def flush(self, db: Transactor) -> None:
        rows: list[tuple[str, str, int, int, int]] = []
        for entry in self._all():
            rows += [(entry.service, entry.slo.name, *m) for m in entry.ledger.closed]
            entry.ledger.closed.clear()
        if rows:

            def write(d: sqlite_utils.Database) -> None:
                d.conn.executemany(_UPSERT, rows)

            await db.write(write)

    async def prune(self, db: Transactor, now: float, retention: float) -> None:
        oldest = int((now - retention) // 60)

        def prune(d: sqlite_utils.Database) -> None:
            d.execute("DELETE FROM slo_minutes WHERE minute < ?", [oldest])

        await db.write(prune)

    def _all(self) -> list[_Tracked]:
        return [entry for entries in self._tracked.values() for entry in entries]

    def _status(self, entry: _Tracked, now: float) -> dict[str, object]:
        ledger = entry.ledger
        this_month, previous = entry.months(now)
        return {
            "name": entry.slo.name,
            "objective": entry.slo.objective,
            "period": format_duration(entry.slo.period),
            "kind": "latency" if entry.threshold is not None else "availability",
            "latency_threshold": None
            if entry.threshold is None
            else format_duration(entry.threshold),
            "sli": ledger.period().sli,
            "error_budget_remaining": ledger.budget_remaining(),
            "error_budget_remaining_minutes": ledger.budget_remaining_minutes(),
            "sli_by_window": {name: ledger.window(name).sli for name in WINDOWS},
            "burn_rates": {name: ledger.burn_rate(name) for name in WINDOWS},
            "sla": {
                "current": ledger.month_report(this_month).to_json(),
                "previous": ledger.month_report(previous).to_json(),
            },
        }

    def _publish_transitions(self, entry: _Tracked) -> None:
        ledger = entry.ledger
        for tier in TIERS:
            factor = tier.factor(entry.slo.period)
            long_rate, short_rate = ledger.burn_rate(tier.long), ledger.burn_rate(tier.short)
            over = (
                long_rate is not None
                and short_rate is not None
                and long_rate > factor
                and short_rate > factor
            )
            name = f"{tier.long}-{tier.short}"
            if over and name not in entry.firing:
                entry.firing.add(name)
                self._bus.publish(
                    "slo.burn",
                    {
                        "service": entry.service,
                        "slo": entry.slo.name,
                        "severity": tier.severity,
                        "windows": [tier.long, tier.short],
                        "burn_rate": long_rate,
                        "threshold": factor,
                    },
                )
            elif not over:
                entry.firing.discard(name)
        remaining = ledger.budget_remaining()
        exhausted = remaining is not None and remaining <= 0
        if exhausted and not entry.exhausted:
            self._bus.publish(
                "slo.budget_exhausted",
                {"service": entry.service, "slo": entry.slo.name, "remaining": remaining},
            )
        entry.exhausted = exhausted


_UPSERT = (
    "INSERT INTO slo_minutes (service, slo, minute, good, valid) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(service, slo, minute) DO UPDATE SET "
    "good = good + excluded.good, valid = valid + excluded.valid"
)


def _reader(service: str, slo: str) -> Callable[[sqlite_utils.Database], list[Any]]:
    def read(db: sqlite_utils.Database) -> list[Any]:
        cursor = db.execute(
            "SELECT minute, good, valid FROM slo_minutes WHERE service = ? AND slo = ? "
            "ORDER BY minute",
            [service, slo],
        )
        return cursor.fetchall()

    return read


def _create_table(db: sqlite_utils.Database) -> None:
    if not db["slo_minutes"].exists():
        db["slo_minutes"].create(  # type: ignore[union-attr]
            {"service": str, "slo": str, "minute": int, "good": int, "valid": int},
            pk=("service", "slo", "minute"),
        )


class SloCollector(Collector):
    """The SLO metrics of DESIGN.md §4 (one series set per SLO: a small family)."""

    def __init__(self, book: SloBook, clock: Callable[[], float]) -> None:
        self._book, self._clock = book, clock

    def collect(self) -> Iterator[Metric]:
        objective = GaugeMetricFamily(
            "hms_slo_objective_ratio", "The SLO's objective.", labels=["service", "slo"]
        )
        sli = GaugeMetricFamily(
            "hms_slo_sli_ratio",
            "Good over valid events in the window.",
            labels=["service", "slo", "window"],
        )
        burn = GaugeMetricFamily(
            "hms_slo_burn_rate",
            "Error ratio over the error budget.",
            labels=["service", "slo", "window"],
        )
        remaining = GaugeMetricFamily(
            "hms_slo_error_budget_remaining_ratio",
            "Error budget left over the SLO period (1 untouched, 0 spent).",
            labels=["service", "slo"],
        )
        sla = GaugeMetricFamily(
            "hms_sla_availability_ratio",
            "Availability of the calendar month (current and previous).",
            labels=["service", "slo", "month"],
        )
        now = self._clock()
        for entry in self._book.evaluated(now):
            ledger, labels = entry.ledger, [entry.service, entry.slo.name]
            objective.add_metric(labels, ledger.objective)
            period = format_duration(entry.slo.period)
            windows = {name: ledger.window(name) for name in WINDOWS} | {period: ledger.period()}
            for window, sums in windows.items():
                if sums.sli is not None:
                    sli.add_metric([*labels, window], sums.sli)
                    burn.add_metric([*labels, window], (sums.error_ratio or 0.0) / ledger.budget)
            left = ledger.budget_remaining()
            if left is not None:
                remaining.add_metric(labels, left)
            for month in entry.months(now):
                report = ledger.month_report(month)
                if report.availability is not None:
                    sla.add_metric([*labels, month], report.availability)
        yield from (objective, sli, burn, remaining, sla)
