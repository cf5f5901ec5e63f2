"""Duration strings (`500ms`, `10s`, `1h30m`, `2d`) as used in config and the HTTP API."""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
MAX_SECONDS = 100 * 365 * 86400.0  # far beyond any real timeout, well inside timedelta
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


@lru_cache(maxsize=1024)  # the same few strings ("30s") arrive with every registration
def parse_duration(text: str) -> timedelta:
    """Parse `500ms`, `10s`, `5m`, `1h30m`, `2d` into a timedelta.

    Bare numbers are refused on purpose: `ttl: 30` could mean seconds or
    minutes, and Prometheus made the same choice for the same reason.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as '10s', got {type(text).__name__}")
    cleaned = text.strip()
    if not _WHOLE.fullmatch(cleaned):
        raise ValueError(f"invalid duration {text!r} (expected e.g. 500ms, 10s, 5m, 1h30m, 2d)")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(cleaned))
    if not seconds <= MAX_SECONDS:  # also false for inf
        raise ValueError(f"duration {text!r} is longer than 100 years")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta | float) -> str:
    """Render a duration the way parse_duration reads it back (`90s` -> `1m30s`)."""
    total_ms = round((delta.total_seconds() if isinstance(delta, timedelta) else delta) * 1000)
    if total_ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, total_ms = divmod(total_ms, size)
        if count:
            parts.append(f"{count}{unit}")
    if total_ms:
        parts.append(f"{total_ms}ms")
    return "".join(parts)
