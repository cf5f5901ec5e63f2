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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from registry import format_duration

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
