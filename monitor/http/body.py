"""Reading request bodies: bounded in size and time, JSON only, validated strictly."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from registry.storable import load_json

from .errors import HttpError
from .limits import DEFAULT_READ_TIMEOUT, READ_TIMEOUT

M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request) -> bytes:
    """The whole body: at most MAX_BODY_BYTES (413), within the read timeout (408)."""
    if request.content.is_eof():  # all of it came with the headers: nothing to wait for
        return await request.read()  # (a timer armed and cancelled costs ~10 us a request)
    seconds = request.config_dict.get(READ_TIMEOUT, DEFAULT_READ_TIMEOUT)
    try:
        async with asyncio.timeout(seconds):
            return await request.read()  # bounded by the app's client_max_size
    except TimeoutError:
        raise HttpError(408, f"request body not received within {seconds:g}s") from None


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read a JSON body into `model`, or raise a 400/422 naming every bad field."""
    raw = await read_body(request)
    if not raw:
        raise HttpError(400, "request body is empty; expected a JSON object")
    check_content_type(request)
    decode_json(raw)  # the same bounds for every body, whatever the model accepts
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise HttpError(422, "invalid request body", details=field_errors(exc)) from None


async def parse_json_object(request: web.Request, what: str) -> dict[str, Any]:
    """The body as a JSON object (an empty body is {}), or a 400/415/422."""
    raw = await read_body(request)
    if not raw:
        return {}
    check_content_type(request)
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise HttpError(422, f"{what} must be a JSON object")
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
    raise HttpError(415, f"expected a JSON body (application/json), got {media or declared!r}")


def decode_json(raw: bytes) -> Any:
    """Every request body's JSON goes through here: malformed JSON is a 400, JSON that
    could not be stored (nested too deeply, numbers beyond 64 bits) a 400/422 (STATUS),
    never a 500 later when it is written or served."""
    return load_json(raw)


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"].removeprefix("Value error, "),
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]


def query_int(raw: str, name: str, low: int, high: int) -> int:
    """A query parameter's integer, 400 unless it is one within [low, high]."""
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be between {low} and {high}")
    return value
