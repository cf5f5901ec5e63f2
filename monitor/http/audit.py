"""The audit trail at the door: each route that changes state declares its action
(`Route.audit`), and its handler is wrapped to record who did it, in the change's own
transaction; every 401 and 403 is counted as a refusal (error_middleware calls `refused`).

Only audited routes are wrapped: heartbeats, task polls and publishes pay nothing."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from monitor.audit.abc import ANONYMOUS, AuditRecord
from monitor.audit.trail import AuditTrail
from monitor.http.auth import GRANT
from monitor.http.errors import HttpError
from monitor.http.forward import FORWARDED_BY
from monitor.storage.riders import dismount, unmount

TRAIL = web.AppKey("hms_audit_trail", AuditTrail)
RECORD = web.RequestKey("hms_audit_record", AuditRecord)
REQUEST_ID = "X-Request-Id"
# Ours: unique, not secret (this daemon's random prefix, then a count).
_PREFIX = secrets.token_hex(4) + "-"
_REQUESTS = itertools.count(1)
# A proxy's request id is kept when it looks like one; anything else gets ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_TARGET = 256

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_PREFIX}{next(_REQUESTS):x}"


def actor(request: web.Request) -> str:
    grant = request.get(GRANT)
    return grant.name if grant is not None else ANONYMOUS


def note(
    request: web.Request, trail: AuditTrail, action: str, target: str, outcome: int
) -> AuditRecord:
    return AuditRecord(
        time=trail.now(),
        actor=actor(request),
        action=action,
        target=printable(target)[:MAX_TARGET],
        outcome=outcome,
        request_id=request_id(request),
        client=client(request),
    )


def client(request: web.Request) -> str:
    """The peer's address; for a request another replica forwarded (http/forward.py), the
    address that replica was sent from, then `via` the replica: the part before `via` is
    that replica's word (or a client's claim), the part after is the peer itself."""
    peer = request.remote or ""
    if FORWARDED_BY not in request.headers:
        return peer
    chain = request.headers.get("X-Forwarded-For", "")
    origin = printable(chain.rsplit(",", 1)[-1].strip())[:64]
    return f"{origin} via {peer}" if origin else peer


def printable(text: str) -> str:
    """What a request put in a record, storable in either database: aiohttp hands
    undecodable header bytes on as surrogates, which neither encodes (nor a NUL,
    PostgreSQL); each such character becomes `?`."""
    if text.isprintable() and text.isascii():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def audited(action: str, outcome: int, target: str | None, handler: Handler) -> Handler:
    """`handler`, its change recorded as `action` on `target` (default: the path's
    parameters joined by `/`) with `outcome` (the route's first reply; a handler that
    answers another sets `request[RECORD].outcome` before its write)."""

    async def record_the_change(request: web.Request) -> web.StreamResponse:
        trail = request.app.get(TRAIL)
        if trail is None:
            return await handler(request)
        subject = target if target is not None else "/".join(request.match_info.values())
        record = note(request, trail, action, subject, outcome)
        request[RECORD] = record
        mounted = trail.mount(record)
        try:
            response = await handler(request)
        except web.HTTPException as answer:  # a redirect (a sign-in) is answered by raising
            _answered(request, record, answer)
            raise
        finally:
            unmount(mounted)
        _answered(request, record, response)
        return response

    return record_the_change


def _answered(request: web.Request, record: AuditRecord, response: web.StreamResponse) -> None:
    """The answer names the record's request id; a refusal answered as a page is counted
    (the record itself was told to the log and the bus when its change committed)."""
    if response.status in (401, 403):  # a refusal answered as a page (a wrong sign-in)
        refused(request, response.status)
    response.headers[REQUEST_ID] = record.request_id


def refused(request: web.Request, status: int) -> None:
    """A 401 or 403 answered: counted (written within a second, a row a minute)."""
    trail = request.app.get(TRAIL)
    if trail is None:
        return
    route = request.match_info.route
    attempted = getattr(route.resource, "canonical", None) or request.path
    target = f"{request.method} {attempted}"
    trail.refused(note(request, trail, "", target, status))


def answered(request: web.Request, status: int) -> None:
    """The status the change will be answered with, decided just before its write (201
    created or 200 updated): its audit record says so."""
    record = request.get(RECORD)
    if record is not None:
        record.outcome = status


async def keep(request: web.Request, actor: str | None = None) -> None:
    """The record of a change that writes nothing else (a sign-in), in a transaction of its
    own; `actor` when the request had no token in its header (the sign-in form's)."""
    trail, record = request.app.get(TRAIL), request.get(RECORD)
    if trail is None or record is None:
        return
    if actor is not None:
        record.actor = actor
    dismount()  # not also with this very write
    await trail.record(record)


def filter_text(query: Mapping[str, str], name: str) -> str | None:
    """A trail filter's text (GET /v1/audit, the page's /audit); control characters (a NUL:
    PostgreSQL refuses it) match no record and are refused as the mistake they are."""
    raw = query.get(name)
    if not raw:
        return None
    if not raw.isprintable():
        raise HttpError(400, f"{name} must not contain control characters")
    return raw
