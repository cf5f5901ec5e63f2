"""The JSON error shape every route answers with, and strict request-body parsing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .responses import json_response

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 1024 * 1024
# A body must arrive within this many seconds (a slow upload holds a connection and a
# buffer); the app sets it from server.read_timeout, which also bounds headers (monitor/cli.py).
READ_TIMEOUT = web.AppKey("read_timeout", float)
DEFAULT_READ_TIMEOUT = 15.0

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


class ApiError(Exception):
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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the JSON error shape; nothing escapes as an HTML page."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, code=exc.code, details=exc.details)
        if exc.status == 408:
            response.force_close()  # the rest of a slow body is not worth waiting for
        return response
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


async def read_body(request: web.Request) -> bytes:
    """The whole body: at most MAX_BODY_BYTES (413), within the read timeout (408)."""
    seconds = request.config_dict.get(READ_TIMEOUT, DEFAULT_READ_TIMEOUT)
    try:
        async with asyncio.timeout(seconds):
            return await request.read()  # bounded by the app's client_max_size
    except TimeoutError:
        raise ApiError(408, f"request body not received within {seconds:g}s") from None


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read a JSON body into `model`, or raise a 400/422 naming every bad field."""
    raw = await read_body(request)
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise ApiError(400, _json_problem(raw), code="malformed_json") from None
        raise ApiError(422, "invalid request body", details=field_errors(exc)) from None


def _json_problem(raw: bytes) -> str:
    """A message that says where the JSON breaks (pydantic's is not meant for users)."""
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"malformed JSON: {exc}"
    except RecursionError:
        return "malformed JSON: nested too deeply"
    return "malformed JSON"


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"].removeprefix("Value error, "),
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]
