"""Per-service uptime by day (90 days) and latency by hour (24 hours), kept in memory.

The status page draws every service's bars from here, never from SQLite: the
rollup table `service_hours` restores it at start and each results flush adds
the minutes it wrote. A service costs ~115 small entries, whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from monitor.health.abc import DayRow, HourRow

UPTIME_DAYS = 90
SPARK_HOURS = 24


@dataclass(kw_only=True, slots=True)
class Tally:
    count: int = 0
    successes: int = 0
    latency_sum: float = 0.0

    @property
    def ratio(self) -> float | None:
        return self.successes / self.count if self.count else None

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.successes if self.successes else None


@dataclass(frozen=True, slots=True, kw_only=True)
class UptimeSummary:
    days: tuple[tuple[int, Tally | None], ...]  # oldest first, UPTIME_DAYS of them
    hours: tuple[float | None, ...]  # mean latency per hour, oldest first
    ratio: float | None  # over all the days shown


class Uptime:
    def __init__(self) -> None:
        self._days: dict[str, dict[int, Tally]] = {}
        self._hours: dict[str, dict[int, Tally]] = {}
        self._trimmed_at = -1  # the hour of the last trim; entries age out hourly

    def restore(self, days: Iterable[DayRow], hours: Iterable[HourRow], now: float) -> None:
        self._days.clear()
        self._hours.clear()
        self._trimmed_at = -1
        for service, day, count, successes in days:
            self._days.setdefault(service, {})[day] = Tally(count=count, successes=successes)
        for service, hour, count, successes, latency_sum in hours:
            self._hours.setdefault(service, {})[hour] = Tally(
                count=count, successes=successes, latency_sum=latency_sum
            )
        self._trim(now)

    def add(self, hours: Iterable[HourRow], now: float) -> None:
        for service, hour, count, successes, latency_sum in hours:
            for table, key in ((self._days, hour // 24), (self._hours, hour)):
                tally = table.setdefault(service, {}).setdefault(key, Tally())
                tally.count += count
                tally.successes += successes
                tally.latency_sum += latency_sum
        self._trim(now)

    def summary(self, service: str, now: float) -> UptimeSummary:
        today, hour = int(now // 86400), int(now // 3600)
        days = self._days.get(service, {})
        shown = tuple((day, days.get(day)) for day in range(today - UPTIME_DAYS + 1, today + 1))
        total = Tally()
        for _, tally in shown:
            if tally is not None:
                total.count += tally.count
                total.successes += tally.successes
        hours = self._hours.get(service, {})
        latencies = tuple(
            tally.mean_latency if (tally := hours.get(h)) is not None else None
            for h in range(hour - SPARK_HOURS + 1, hour + 1)
        )
        return UptimeSummary(days=shown, hours=latencies, ratio=total.ratio)

    def _trim(self, now: float) -> None:
        if int(now // 3600) == self._trimmed_at:
            return
        self._trimmed_at = int(now // 3600)
        first_day, first_hour = int(now // 86400) - UPTIME_DAYS, int(now // 3600) - SPARK_HOURS
        for table, first in ((self._days, first_day), (self._hours, first_hour)):
            for entries in table.values():
                for key in [k for k in entries if k <= first]:
                    del entries[key]
