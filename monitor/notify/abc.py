"""The notifier's interfaces: the body format of a notification and the outbox store."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from monitor.config import Notification
    from scheduler import Event


class NotificationFormat(StrEnum):
    """The `format` of a notification in the config: how its body is written."""

    JSON = "json"
    SLACK = "slack"


class NotifyResult(StrEnum):
    """Values of the `result` label of hms_notifications_total."""

    SENT = "sent"  # the receiver answered 2xx
    RETRIED = "retried"  # an attempt failed; another is scheduled
    FAILED = "failed"  # out of attempts, or a status not worth retrying
    SUPPRESSED = "suppressed"  # maintenance or a dependency is down
    DEDUPED = "deduped"  # the state last sent for its subject, within min_interval


class BodyFormat(Protocol):
    """Writes the body POSTed for one event (formats/, one module per format)."""

    def __call__(self, notification: Notification, event: Event) -> bytes: ...


@dataclass(slots=True, kw_only=True)
class Delivery:
    """One event on its way to one receiver: a row of the outbox until sent or given up."""

    id: str
    name: str  # the notification's
    topic: str
    body: bytes
    attempts: int = 0
    due: float = 0.0  # wall clock of the next attempt


class OutboxStore(Protocol):
    """Deliveries not yet done, kept so a restart sends them again (at least once).

    `save` and `delete` raise StoreUnavailable when storage fails; the notifier then
    goes on from memory."""

    async def create_tables(self) -> None:
        """Idempotent."""
        ...

    async def load(self) -> list[Delivery]:
        """Every stored delivery, the earliest due first."""
        ...

    async def save(self, delivery: Delivery) -> None:
        """Insert the delivery, or replace the one stored under its id."""
        ...

    async def delete(self, delivery_id: str) -> None:
        """Forget a delivery; an unknown id is not an error."""
        ...
