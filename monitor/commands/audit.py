"""`hms-mgmt audit`: the daemon's audit trail (GET /v1/audit) as a terminal table."""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass

from monitor.audit.abc import MAX_LIMIT, parse_time
from monitor.commands.status import StatusError, fetch, table
from monitor.config import Config
from monitor.http.auth import allows
from registry.durations import parse_duration

COLUMNS = ("time", "actor", "action", "target", "outcome", "count", "client")
PAGE = MAX_LIMIT  # the most records GET /v1/audit answers at once


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    since: float | None = None  # Unix seconds
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in `*`
    limit: int = 1000  # rows printed at most


def since_time(text: str, now: float | None = None) -> float:
    """`1d`, `2h30m` (that long ago) or an RFC 3339 time, as Unix seconds."""
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        return (time.time() if now is None else now) - ago.total_seconds()
    try:
        return parse_time(text)
    except ValueError:
        raise StatusError(
            f"--since must be a duration (1d, 2h) or an RFC 3339 time, not {text!r}"
        ) from None


def audit_token(config: Config) -> str | None:
    """The config's first token that may read the trail; None when auth is off. A config
    whose tokens all lack audit:read is refused here, not by a 403 from the daemon."""
    auth = config.server.auth
    if auth is None or not auth.tokens:
        return None
    for token in auth.tokens:
        if allows(token.scopes, "audit", "read"):
            return token.token.get_secret_value()
    raise StatusError("no token in server.auth.tokens of the config holds audit:read or *")


def audit_report(
    base: str, token: str | None, wanted: AuditFilter, *, page_size: int = PAGE
) -> tuple[str, bool]:
    """The table, oldest first, following the daemon's pages (`page_size` records each)
    up to `wanted.limit` rows; and whether more records matched than were shown."""
    rows = [[column.upper() for column in COLUMNS]]
    cursor: str | None = ""
    while cursor is not None and len(rows) - 1 < wanted.limit:
        query = {
            "since": "" if wanted.since is None else f"{wanted.since:.3f}",
            "actor": wanted.actor or "",
            "action": wanted.action or "",
            "limit": str(min(page_size, wanted.limit - (len(rows) - 1))),
            "cursor": cursor,
        }
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v})
        page = fetch(base, f"/v1/audit?{params}", token)
        if page is None:
            raise StatusError(f"the daemon at {base} keeps no audit trail (GET /v1/audit: 404)")
        rows += [[str(record[column]) for column in COLUMNS] for record in page["records"]]
        cursor = page["next_cursor"]
    return "\n".join(table(rows)) + "\n", cursor is not None
