"""Session cookies: a signed, expiring stand-in for a bearer token, for people's browsers.

A person signs in once at `/login` (routes/login.py) and gets a cookie good for reads only
(auth.py decides what it may do). The cookie names its grant and is signed with a key
derived from that grant's token, so removing or changing the token ends its sessions
without touching anyone else's.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Protocol, TypeVar

SESSION_COOKIE = "hms_session"
SESSION_SECONDS = 12 * 3600
VERSION = "v1"


class Signer(Protocol):
    """What a session needs of a grant: a public id and the digest of its token."""

    @property
    def id(self) -> str: ...

    @property
    def digest(self) -> bytes: ...


G = TypeVar("G", bound=Signer)


def session(grant: Signer, now: float | None = None) -> str:
    """A cookie value standing for `grant` until SESSION_SECONDS from now."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{VERSION}.{expires}.{grant.id}.{_sign(expires, grant)}"


def from_session(value: str | None, grants: Iterable[G], now: float | None = None) -> G | None:
    """The grant among `grants` that signed `value`, unless it expired or is not a session."""
    if not value:
        return None
    version, _, rest = value.partition(".")
    expires_text, _, rest = rest.partition(".")
    grant_id, _, mac = rest.partition(".")
    if version != VERSION or not expires_text.isdigit():
        return None
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return None
    for grant in grants:
        if grant.id == grant_id and hmac.compare_digest(mac, _sign(expires, grant)):
            return grant
    return None


def _sign(expires: int, grant: Signer) -> str:
    # Keyed by the token itself: only its holder could have signed in, and a session ends
    # with its token without touching the sessions of the others.
    key = hashlib.sha256(b"hms-session" + grant.digest).digest()
    return hmac.new(key, b"%d." % expires, hashlib.sha256).hexdigest()
