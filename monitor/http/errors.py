"""The JSON error shape every route answers with, and the one table from core errors to it.

Below the edge, errors are plain exceptions (registry/errors.py, workflows/errors.py,
registry/storable.py); STATUS gives each its HTTP status and error code, so a handler
lets them rise and error_middleware answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from registry.errors import Conflict, Overloaded, RegistryError, StoreUnavailable, UnknownInstance
from registry.storable import MalformedJson, UnstorableJson
from workflows.errors import (
    DefinitionConflict,
    InvalidDefinition,
    ProcessFinished,
    UnknownProcess,
    UnknownWorkflow,
    WorkflowError,
)

from .limits import MAX_BODY_BYTES
from .responses import json_response

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class HttpError(Exception):
    """Raised anywhere under a handler; rendered as `{"error": {code, message, details}}`."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, details: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, "error")
        self.message = message
        self.details = details


def error_response(
    status: int, message: str, *, code: str | None = None, details: Any = None
) -> web.Response:
    body = {
        "error": {
            "code": code or _STATUS_CODES.get(status, "error"),
            "message": message,
            "details": details,
        }
    }
    return json_response(body, status=status)


# A core error's status and code; the first class of an exception's MRO listed here wins.
STATUS: Final[Mapping[type[Exception], tuple[int, str]]] = {
    RegistryError: (400, "bad_request"),  # a refusal not listed below: as the old base did
    UnknownInstance: (404, "not_found"),
    Conflict: (409, "conflict"),
    Overloaded: (503, "overloaded"),
    StoreUnavailable: (503, "storage_unavailable"),
    WorkflowError: (400, "bad_request"),
    UnknownWorkflow: (404, "not_found"),
    UnknownProcess: (404, "not_found"),
    ProcessFinished: (409, "conflict"),
    DefinitionConflict: (409, "conflict"),
    InvalidDefinition: (422, "invalid"),
    MalformedJson: (400, "malformed_json"),
    UnstorableJson: (422, "invalid"),
}


def status_of(exc: BaseException) -> tuple[int, str] | None:
    """The status and code STATUS gives `exc`'s class or its nearest listed base."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Told of each 401 and 403 answered (the audit trail counts refusals): set by the app.
REFUSED: web.AppKey[Callable[[web.Request, int], None]] = web.AppKey("hms_refused")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the JSON error shape; nothing escapes as an HTML page."""
    try:
        return await handler(request)
    except HttpError as exc:
        if exc.status in (401, 403) and (count_refusal := request.app.get(REFUSED)):
            count_refusal(request, exc.status)  # the audit trail's (http/audit.py)
        response = error_response(exc.status, exc.message, code=exc.code, details=exc.details)
        if exc.status == 408:
            response.force_close()  # the rest of a slow body is not worth waiting for
        return response
    except tuple(STATUS) as exc:
        status, code = status_of(exc) or (500, "internal")
        return error_response(status, str(exc), code=code)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        response.force_close()  # nor is the rest of a huge one
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error; see the daemon log", code="internal")
