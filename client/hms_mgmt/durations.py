"""Durations as the SDK takes them: strings the daemon reads ("500ms", "30s", "2d") or seconds.

The SDK carries its own small parser so it never imports the daemon; the daemon
refuses bare numbers, so numbers become strings before they go on the wire.
"""

from __future__ import annotations

import re

Duration = str | float | int

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


def seconds(value: Duration) -> float:
    """`"1m30s"` -> 90.0, `90` -> 90.0; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s' or seconds, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not _WHOLE.fullmatch(value.strip()):
        raise ValueError(f"invalid duration {value!r} (expected e.g. 500ms, 30s, 2d, or seconds)")
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value.strip()))


def duration_text(value: Duration) -> str:
    """The wire form: strings are checked and kept as written, seconds become `"90s"`/`"1500ms"`."""
    if isinstance(value, str):
        seconds(value)
        return value.strip()
    total_ms = round(seconds(value) * 1000)
    if total_ms % 1000:
        return f"{total_ms}ms"
    return f"{total_ms // 1000}s"
