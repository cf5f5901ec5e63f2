"""The slack body: `{"text": ...}`, what a Slack incoming webhook takes."""

from __future__ import annotations

import orjson

from monitor.config import Notification
from monitor.notify.events import summary_of
from scheduler import Event


def render(notification: Notification, event: Event) -> bytes:
    return orjson.dumps({"text": f"[hms-mgmt] {summary_of(event)}"})
