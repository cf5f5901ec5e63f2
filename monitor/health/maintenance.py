"""Maintenance windows: daily, on weekdays, or one-off, each in its own time zone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from monitor.config import WEEKDAYS, Maintenance


@dataclass(frozen=True, slots=True)
class Window:
    services: frozenset[str]
    duration: timedelta
    zone: ZoneInfo
    start: tuple[int, int] | None  # local hour, minute of a recurring window
    weekdays: frozenset[int] | None  # None: every day
    at: datetime | None  # a one-off window (aware)

    def contains(self, moment: datetime) -> bool:
        if self.at is not None:
            return self.at <= moment < self.at + self.duration
        assert self.start is not None
        local = moment.astimezone(self.zone)
        # A window that began on an earlier day can still be open (23:00 + 2h, or 3d long).
        for days_back in range(self.duration.days + 2):
            day = (local - timedelta(days=days_back)).date()
            if self.weekdays is not None and day.weekday() not in self.weekdays:
                continue
            hour, minute = self.start
            opens = datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.zone)
            if opens <= local < opens + self.duration:
                return True
        return False


def window_from_config(entry: Maintenance) -> Window:
    zone = ZoneInfo(entry.timezone)
    at = entry.at
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=zone)
    weekdays = None
    if entry.every is not None:
        weekdays = frozenset(WEEKDAYS.index(day) for day in entry.every)
    return Window(
        services=frozenset(entry.services),
        duration=entry.duration,
        zone=zone,
        start=(entry.start.hour, entry.start.minute) if entry.start is not None else None,
        weekdays=weekdays,
        at=at,
    )


class MaintenanceCalendar:
    def __init__(self, entries: Iterable[Maintenance]) -> None:
        self.replace(entries)

    def replace(self, entries: Iterable[Maintenance]) -> None:
        """New windows (config reload); everyone holding the calendar sees them."""
        self.windows = tuple(window_from_config(entry) for entry in entries)
        self.services = frozenset(s for w in self.windows for s in w.services)

    def active(self, service: str, at: float) -> bool:
        if service not in self.services:
            return False
        moment = datetime.fromtimestamp(at, UTC)
        return any(service in w.services and w.contains(moment) for w in self.windows)
