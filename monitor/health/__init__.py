"""Health: instance state machines, maintenance, the checker probing on the timetable, results."""

from .abc import RAW_RETENTION, ResultStore
from .book import HealthBook, Tracker, judge
from .checker import HealthChecker, ProbeBucket, latency_buckets
from .maintenance import MaintenanceCalendar
from .results import ProbeResults
from .stores.sqlite import SqliteResultStore

__all__ = [
    "RAW_RETENTION",
    "HealthBook",
    "HealthChecker",
    "MaintenanceCalendar",
    "ProbeBucket",
    "ProbeResults",
    "ResultStore",
    "SqliteResultStore",
    "Tracker",
    "judge",
    "latency_buckets",
]
