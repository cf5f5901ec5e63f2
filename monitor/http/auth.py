"""Bearer tokens with scopes: who may register which services, publish, start or cancel.

A scope is `*` (everything) or `<verb>:<glob>`, the glob matched against the
subject of the call (the service name for `register`, the topic for
`publish` and `subscribe`, the workflow for `start` and `cancel`).

Browsers cannot send a bearer header, so a person signs in once at `/login`
with a token and gets a session cookie: HttpOnly, SameSite=Strict, signed
with a key derived from that token (removing or changing the token ends its
sessions) and good for reads only. Every state change still needs the header,
so a forged cross-site request has nothing to ride on. The cookie itself: sessions.py.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Middleware

from monitor.http import sessions
from monitor.http.errors import Handler, HttpError
from monitor.http.sessions import SESSION_COOKIE
from scheduler.bus import AUDIT_TOPICS, READABLE_TOPICS

log = logging.getLogger(__name__)

# Open without a token even when reads are protected: orchestrators probe the first two,
# people sign in at the third, and the assets are the page's own code (no data).
UNPROTECTED_PATHS = frozenset({"/healthz", "/readyz", "/login"})
UNPROTECTED_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Grant:
    """One configured token, kept only as its digest, with the name of who holds it."""

    name: str
    digest: bytes
    scopes: tuple[str, ...]

    @property
    def id(self) -> str:
        """Names the grant in a session cookie without revealing anything of the token."""
        return hashlib.sha256(b"grant-id" + self.digest).hexdigest()[:16]

    def allows(self, verb: str, subject: str) -> bool:
        return allows(self.scopes, verb, subject)


def allows(scopes: Iterable[str], verb: str, subject: str) -> bool:
    """Whether `scopes` (`*`, or `<verb>:<glob>`) let their holder `verb` `subject`."""
    for scope in scopes:
        if scope == "*":
            return True
        scope_verb, _, pattern = scope.partition(":")
        if scope_verb == verb and fnmatchcase(subject, pattern):
            return True
    return False


GRANT = web.RequestKey("hms_grant", Grant)


class Authorizer:
    def __init__(
        self, tokens: Iterable[tuple[str, str, Sequence[str]]], *, protect_reads: bool
    ) -> None:
        self._grants: tuple[Grant, ...] = ()
        self.replace(tokens, protect_reads=protect_reads)

    def replace(
        self, tokens: Iterable[tuple[str, str, Sequence[str]]], *, protect_reads: bool
    ) -> None:
        """Swap the (name, token, scopes) at once (a config reload): a removed token, and
        every session it signed, stops working with the next request; scopes apply as they
        now read."""
        self._grants = tuple(
            Grant(name, _digest(token), tuple(scopes)) for name, token, scopes in tokens
        )
        self.protect_reads = protect_reads

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def identify(self, header: str | None) -> Grant | None:
        """The grant whose token is in `Authorization: Bearer <token>`, in constant time."""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found: Grant | None = None
        for grant in self._grants:  # no early exit: timing does not reveal which token matched
            if hmac.compare_digest(given, grant.digest):
                found = grant
        return found

    def session(self, grant: Grant, now: float | None = None) -> str:
        """A cookie value standing for `grant` (sessions.py)."""
        return sessions.session(grant, now)

    def from_session(self, value: str | None, now: float | None = None) -> Grant | None:
        """The grant of a session cookie, while its token is still configured."""
        return sessions.from_session(value, self._grants, now)

    def may_subscribe(self, request: web.Request, topic: str) -> bool:
        """Events of `topic` on the SSE stream: the daemon's own topics go to whoever may
        read, but audit.* only to `audit:read` holders (DESIGN §3; `subscribe:*` is not
        that); what services publish needs a `subscribe` scope. Without auth the daemon
        is open: everyone may read everything, the audit trail included."""
        if not self.enabled:
            return True
        if topic.startswith(AUDIT_TOPICS):
            return self.reads_audit(request)
        if topic.startswith(READABLE_TOPICS):
            return True
        return self.may(request, "subscribe", topic)

    def reads_audit(self, request: web.Request) -> bool:
        """Whether the caller may read the audit trail (`audit:read`; `*` holds it): its
        events, its page and the page's link to it; without auth, everyone may."""
        return self.may(request, "audit", "read")

    def may(self, request: web.Request, verb: str, subject: str) -> bool:
        """Whether the caller's token or session has a scope for `verb` on `subject` (the
        page shows only what its reader may open); without auth, everyone may."""
        if not self.enabled:
            return True
        grant = request.get(GRANT)
        return grant is not None and grant.allows(verb, subject)

    def require(self, request: web.Request, verb: str, subject: str) -> None:
        """Raise 403 unless the caller's token has a scope for `verb` on `subject`."""
        if not self.enabled:
            return
        grant = request.get(GRANT)
        if grant is None:
            raise HttpError(401, "a bearer token is required", code="unauthorized")
        if not grant.allows(verb, subject):
            raise HttpError(403, f"token has no scope for {verb}:{subject}", code="forbidden")

    def middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            if path in UNPROTECTED_PATHS or path.startswith(UNPROTECTED_PREFIXES):
                return await handler(request)
            safe = request.method in SAFE_METHODS
            grant = self.identify(request.headers.get("Authorization"))
            if grant is None and safe:  # a session never authorizes a change
                grant = self.from_session(request.cookies.get(SESSION_COOKIE))
            if grant is None and (not safe or self.protect_reads):
                if safe and "text/html" in request.headers.get("Accept", ""):
                    raise web.HTTPSeeOther(f"/login?{urlencode({'next': request.path_qs})}")
                raise HttpError(401, "a valid bearer token is required", code="unauthorized")
            if grant is not None:
                request[GRANT] = grant
            return await handler(request)

        return authenticate


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time across token lengths.
    return hashlib.sha256(token.encode()).digest()
