"""Health: instance state machines, maintenance, the checker probing on the timetable, results."""

from .book import HealthBook, Tracker, judge
from .checker import HealthChecker, ProbeBucket, latency_buckets
from .maintenance import MaintenanceCalendar
from .results import RAW_RETENTION, ResultStore

__all__ = [
    "RAW_RETENTION",
    "HealthBook",
    "HealthChecker",
    "MaintenanceCalendar",
    "ProbeBucket",
    "ResultStore",
    "Tracker",
    "judge",
    "latency_buckets",
]
