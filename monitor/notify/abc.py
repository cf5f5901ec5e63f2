"""The notifier's interfaces: the body format of a notification and the outbox store."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Collection

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
    TAKEN = "taken"  # another replica adopted it (this one was taken for dead) and sends it


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


@dataclass(frozen=True, slots=True, kw_only=True)
class OncePer:
    """What makes a delivery news: a `fingerprint` (the state) of a `subject` not added
    for the same notification in the `interval` seconds before `now`. `now` is the
    notifier's clock: replicas' clocks differ by far less than an interval of minutes."""

    subject: str  # the event's topic and what it is about
    fingerprint: str
    now: float
    interval: float


class DeliveryTaken(Exception):
    """The delivery's outbox row is no longer its owner's: another replica adopted it (the
    owner was taken for dead) or sent it and deleted it. The owner must not send it."""


class OutboxStore(Protocol):
    """Deliveries not yet done, kept so a restart sends them again (at least once).

    Each row names its owner, the one notifier that sends it (on PostgreSQL a replica's
    member key; on SQLite the one daemon). A dead owner's rows are adopted by a live one
    and sent from there under the same delivery id; the owner claims its row before every
    attempt, so a replica taken for dead that wakes up never sends what was adopted.
    `add` remembers what went out per subject, so the same state reported by two replicas
    (both probing an instance during a handover) goes out once.

    `add`, `save`, `claim`, `delete` and `adopt` raise StoreUnavailable when storage fails; the
    notifier then goes on from memory."""

    async def create_tables(self) -> None:
        """Idempotent."""
        ...

    async def load(self, owner: str) -> list[Delivery]:
        """Every delivery `owner` holds, the earliest due first."""
        ...

    async def add(self, delivery: Delivery, owner: str, *, once: OncePer) -> bool:
        """Store a new delivery as `owner`'s, unless `once` says it was already sent: the
        same state of the same subject added within its interval, by any owner (two
        replicas seeing one transition). Then nothing is stored and the answer is False."""
        ...

    async def save(self, delivery: Delivery, owner: str) -> None:
        """Insert the delivery as `owner`'s, or replace the one stored under its id if
        `owner` holds it; DeliveryTaken if another owner does."""
        ...

    async def claim(self, delivery: Delivery, owner: str) -> None:
        """Store the delivery's `attempts` and `due` if `owner` still holds its row;
        DeliveryTaken if it does not (adopted, or sent and deleted: never stored again)."""
        ...

    async def delete(self, delivery_id: str) -> None:
        """Forget a delivery, whoever holds it (it was sent or given up); an unknown id
        is not an error."""
        ...

    async def owners(self) -> set[str]:
        """The owners some stored delivery names."""
        ...

    async def adopt(self, owner: str, dead_owners: Collection[str]) -> list[Delivery]:
        """Hand every delivery of `dead_owners` to `owner` in one statement and return them,
        the earliest due first. Of owners adopting at once, each delivery goes to one."""
        ...
