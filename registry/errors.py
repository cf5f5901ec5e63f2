"""The JSON error shape every route answers with, and strict request-body parsing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pydantic_core
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .responses import json_response

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 1024 * 1024
# Nesting a body may have. Stored documents wrap a body in a few levels of their own
# (a process's input, an event's envelope) and orjson, which stores them, stops at 255.
MAX_JSON_DEPTH = 64
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
    check_content_type(request)
    decode_json(raw)  # the same bounds for every body, whatever the model accepts
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid request body", details=field_errors(exc)) from None


async def parse_json_object(request: web.Request, what: str) -> dict[str, Any]:
    """The body as a JSON object (an empty body is {}), or a 400/415/422."""
    raw = await read_body(request)
    if not raw:
        return {}
    check_content_type(request)
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise ApiError(422, f"{what} must be a JSON object")
    return data


# Bodies are JSON whatever the request says, since `curl -d` labels JSON as a form; a type
# that is surely not JSON (text, multipart, ...) is refused before anything is parsed.
_JSON_TYPES = ("application/json", "application/x-www-form-urlencoded", "application/octet-stream")


def check_content_type(request: web.Request) -> None:
    declared = request.headers.get("Content-Type")
    if declared is None:
        return
    media = request.content_type  # lower case, parameters removed
    if media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise ApiError(415, f"expected a JSON body (application/json), got {media or declared!r}")


def decode_json(raw: bytes) -> Any:
    """Every request body's JSON goes through here: malformed JSON is a 400, JSON that
    could not be stored (nested too deeply, numbers beyond 64 bits) a 400/422, never a 500
    later when it is written or served."""
    try:
        return load_json(raw)
    except UnstorableJson as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None


class UnstorableJson(ValueError):
    """JSON that is malformed (400) or could not be stored as it is (422)."""

    def __init__(self, message: str, *, status: int = 400, code: str = "malformed_json") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def load_json(raw: bytes) -> Any:
    """Parse JSON that the daemon can store and serve again; raises UnstorableJson.

    C-speed passes only (no walk in Python: a 1 MiB body must not hold the event loop):
    orjson parses, refusing NaN, 1e400, lone surrogates and invalid UTF-8. orjson rounds
    integers beyond 64 bits to floats silently, so a body with a run of 19 digits (the
    shortest such integer) is parsed again by pydantic's parser, which keeps them exact.
    Then orjson writes the value inside enough extra levels to fail on an integer it
    cannot store or on nesting too deep to store inside a document."""
    long_digits = _LONG_DIGITS in raw.translate(_DIGITS)
    try:
        data = orjson.loads(raw)
        if long_digits:
            data = pydantic_core.from_json(raw)
    except ValueError as exc:  # orjson.JSONDecodeError is one
        raise UnstorableJson(f"malformed JSON: {exc}") from None
    if not long_digits and raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return data  # the common small body: nothing left that could fail
    try:
        orjson.dumps(_within(data, ORJSON_MAX_DEPTH - MAX_JSON_DEPTH))
    except orjson.JSONEncodeError as exc:
        if "Integer" in str(exc):
            message = "a number is an integer beyond 64 bits; send it as a string"
            raise UnstorableJson(message, status=422, code="invalid") from None
        message = f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels"
        raise UnstorableJson(message) from None
    return data


# Every digit as "0", everything else as a space: a long integer is then a run of zeros.
_DIGITS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))
_LONG_DIGITS = b"0" * 19
ORJSON_MAX_DEPTH = 254  # orjson.dumps refuses a 255th level of arrays or objects


def _within(data: Any, levels: int) -> Any:
    for _ in range(levels):
        data = [data]
    return data


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"].removeprefix("Value error, "),
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]
