"""JSON the daemon can store and serve again: one parser for every body it keeps.

Request bodies, workflow inputs, services' answers and events all go through
`load_json`, so nothing stored can fail later when it is written or served.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic_core

# Nesting a body may have. Stored documents wrap a body in a few levels of their own
# (a process's input, an event's envelope) and orjson, which stores them, stops at 255.
MAX_JSON_DEPTH = 64


class MalformedJson(ValueError):
    """Not JSON, or nested deeper than MAX_JSON_DEPTH."""


class UnstorableJson(ValueError):
    """JSON that could not be stored as it is (an integer beyond 64 bits)."""


def load_json(raw: bytes) -> Any:
    """Parse JSON that the daemon can store and serve again; raises MalformedJson or
    UnstorableJson (both ValueErrors).

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
        raise MalformedJson(f"malformed JSON: {exc}") from None
    if not long_digits and raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return data  # the common small body: nothing left that could fail
    try:
        orjson.dumps(_within(data, ORJSON_MAX_DEPTH - MAX_JSON_DEPTH))
    except orjson.JSONEncodeError as exc:
        if "Integer" in str(exc):
            message = "a number is an integer beyond 64 bits; send it as a string"
            raise UnstorableJson(message) from None
        message = f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels"
        raise MalformedJson(message) from None
    return data


# Every digit as "0", everything else as a space: a long integer is then a run of zeros.
_DIGITS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))
_LONG_DIGITS = b"0" * 19
ORJSON_MAX_DEPTH = 254  # orjson.dumps refuses a 255th level of arrays or objects


def _within(data: Any, levels: int) -> Any:
    for _ in range(levels):
        data = [data]
    return data
