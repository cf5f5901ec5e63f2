"""When things happen: the event bus and the job layer over APScheduler."""

from .bus import Event, EventBus, Subscription, matches
from .jobs import Cron, Scheduler, Timetable

__all__ = ["Cron", "Event", "EventBus", "Scheduler", "Subscription", "Timetable", "matches"]
