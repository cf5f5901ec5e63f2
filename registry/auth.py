"""Bearer tokens with scopes: who may register which services, publish, start or cancel.

A scope is `*` (everything) or `<verb>:<glob>`, the glob matched against the
subject of the call (the service name for `register`, the topic for
`publish`, the workflow for `start` and `cancel`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from aiohttp import web
from aiohttp.typedefs import Middleware

from .errors import ApiError, Handler

log = logging.getLogger(__name__)

# Open without a token even when reads are protected: orchestrators probe these.
UNPROTECTED_PATHS = frozenset({"/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Grant:
    """One configured token, kept only as its digest."""

    digest: bytes
    scopes: tuple[str, ...]

    def allows(self, verb: str, subject: str) -> bool:
        for scope in self.scopes:
            if scope == "*":
                return True
            scope_verb, _, pattern = scope.partition(":")
            if scope_verb == verb and fnmatchcase(subject, pattern):
                return True
        return False


GRANT = web.RequestKey("hms_grant", Grant)


class Authorizer:
    def __init__(self, tokens: Iterable[tuple[str, Sequence[str]]], *, protect_reads: bool) -> None:
        self._grants = tuple(Grant(_digest(token), tuple(scopes)) for token, scopes in tokens)
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

    def require(self, request: web.Request, verb: str, subject: str) -> None:
        """Raise 403 unless the caller's token has a scope for `verb` on `subject`."""
        if not self.enabled:
            return
        grant = request.get(GRANT)
        if grant is None:
            raise ApiError(401, "a bearer token is required", code="unauthorized")
        if not grant.allows(verb, subject):
            raise ApiError(403, f"token has no scope for {verb}:{subject}", code="forbidden")

    def middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.enabled or request.path in UNPROTECTED_PATHS:
                return await handler(request)
            grant = self.identify(request.headers.get("Authorization"))
            needs_token = request.method not in SAFE_METHODS or self.protect_reads
            if grant is None and needs_token:
                raise ApiError(401, "a valid bearer token is required", code="unauthorized")
            if grant is not None:
                request[GRANT] = grant
            return await handler(request)

        return authenticate


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time across token lengths.
    return hashlib.sha256(token.encode()).digest()
