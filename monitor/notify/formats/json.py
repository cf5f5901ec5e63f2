"""The json body: the event whole, with its subject and summary (the default)."""

from __future__ import annotations

import orjson

from monitor.config import Notification
from monitor.notify.events import subject_of, summary_of
from scheduler import Event


def render(notification: Notification, event: Event) -> bytes:
    return orjson.dumps(
        {
            "notification": notification.name,
            "event": event.topic,
            "subject": subject_of(event),
            "summary": summary_of(event),
            "time": event.time,
            "data": dict(event.data),
        }
    )
