"""What the SDK raises: the daemon's refusals, with its error code, message and HTTP status."""

from __future__ import annotations

from typing import Any


class HmsError(Exception):
    """The daemon answered with an error: `{"error": {"code", "message", "details"}}`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class BadRequest(HmsError):
    """400 or 422: the request itself is wrong; sending it again will not help."""


class Unauthorized(HmsError):
    """401 or 403: no token, a wrong one, or one without the scope this needs."""


class NotFound(HmsError):
    """404: no such workflow, process, service or task delivery."""


class Conflict(HmsError):
    """409: the state changed under the request (a stale task delivery, a config workflow)."""


class Unavailable(HmsError):
    """429 or 5xx: the daemon is overloaded, restarting or its store is down; try again."""


class Unreachable(Unavailable):
    """No answer at all: the daemon is down or the address is wrong (status 0)."""


def error_for(status: int, body: Any) -> HmsError:
    """The exception for a non-2xx answer; `body` is its decoded JSON (or text)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", "error"))
        message = str(error.get("message", ""))
        details = error.get("details")
    else:
        code, message, details = "error", str(body)[:1024], None
    kind: type[HmsError] = HmsError
    if status in (400, 422):
        kind = BadRequest
    elif status in (401, 403):
        kind = Unauthorized
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
    elif status == 429 or status >= 500:
        kind = Unavailable
    return kind(status, code, message, details)
