"""When things happen: the event bus and the job layer over APScheduler."""

from .bus import Event, EventBus, Subscription, matches
from .jobs import Scheduler, Timetable

__all__ = ["Event", "EventBus", "Scheduler", "Subscription", "Timetable", "matches"]
