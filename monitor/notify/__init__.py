"""Notifications: bus events POSTed to webhooks in a configured body format, signed,
rate-limited and retried from a durable outbox."""

from .abc import BodyFormat, Delivery, NotificationFormat, NotifyResult, OutboxStore
from .formats import FORMATS
from .notifier import Notifier
from .stores.sqlite import SqliteOutboxStore

__all__ = [
    "FORMATS",
    "BodyFormat",
    "Delivery",
    "NotificationFormat",
    "Notifier",
    "NotifyResult",
    "OutboxStore",
    "SqliteOutboxStore",
]
