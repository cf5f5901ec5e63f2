"""An audit record, a query of the trail, and the store that keeps them (SQLite or
PostgreSQL: stores/)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

from monitor.storage.riders import Rider

# The actor of a request without a token (the daemon runs without auth, or none was sent).
ANONYMOUS = "anonymous"
REFUSED = "auth.refused"
MAX_LIMIT = 1000


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    time: float  # Unix seconds
    actor: str  # a token's name, `anonymous`, `config-file` or `sighup`
    action: str  # <resource>.<verb>: instance.register, process.start, auth.refused...
    target: str  # what it acted on: payments/p-1, GrantPayment, a process id
    outcome: int  # the HTTP status answered (or that a reload would have had: 200, 422)
    request_id: str = ""
    client: str = ""  # the peer's address
    count: int = 1  # refusals: how many in its minute
    id: int | None = None  # the store's, once written (the cursor of GET /v1/audit)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": rfc3339(self.time),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "client": self.client,
            "count": self.count,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditQuery:
    since: float | None = None  # time >= since
    until: float | None = None  # time < until
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in `*` (process.*)
    target: str | None = None  # exact, or a prefix ending in `*`
    after: int = 0  # records with a higher id (the cursor)
    limit: int = 100
    newest: bool = False  # the newest `limit` records, newest first (the status page's view)


def rfc3339(at: float) -> str:
    """2026-12-01T11:40:03.120Z"""
    seconds, millis = divmod(round(at * 1000), 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@lru_cache(maxsize=64)  # records come in bursts within the same second
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_time(text: str) -> float:
    """Unix seconds or RFC 3339 (a time without a zone is UTC); ValueError otherwise."""
    try:
        return float(text)
    except ValueError:
        pass
    at = datetime.fromisoformat(text.strip().upper())  # RFC 3339 allows a lowercase t and z
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


class AuditStore(Protocol):
    async def open(self) -> None:
        """Create or migrate the table."""
        ...

    def rider(self, record: AuditRecord) -> Rider:
        """Writes `record` in the transaction of the write that carries it (storage/riders)."""
        ...

    async def add(self, record: AuditRecord) -> None:
        """A record in a transaction of its own (a sign-in, a reload: no other write)."""
        ...

    async def add_refusals(self, records: list[AuditRecord], minute: int) -> None:
        """Refusals of one minute (Unix seconds // 60): one row per actor and action in that
        minute, its count raised by each record's count."""
        ...

    async def list(self, query: AuditQuery) -> list[AuditRecord]:
        """Matching records in id order (descending with `query.newest`), after
        `query.after`, at most `query.limit`."""
        ...

    async def prune(self, before: float) -> int:
        """Delete the records older than `before` (retention: by age only)."""
        ...
