"""A call step's `expect:`: conditions in the probe language over the service's answer.

Only an answer the step would otherwise take (a 2xx) is judged. A 5xx or a `retry_on`
status stays a retryable failure and any other status fails the step as before: `expect`
adds checks, it never turns a refusal into success. When a condition fails, the service
did answer, and asking again would get the same answer: the step fails for good (no
retry), its error naming each failing condition with what was seen, its status and body
kept for the process's `error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson

from registry.conditions import MISSING, Condition

from .caller import ERROR_BODY_BYTES, CallResult


class Answer:
    """A call's answer as the condition language reads it (`registry.conditions.Observation`)."""

    __slots__ = ("_json", "_raw", "response_time", "status")

    connected = True  # an answer came: the connection was made
    certificate_expires_in: float | None = None  # not looked at by calls

    def __init__(self, result: CallResult) -> None:
        self.status, self.response_time = result.status, result.elapsed
        self._raw = result.raw
        self._json: Any = MISSING

    @property
    def body_text(self) -> str:
        return self._raw.decode("utf-8", "replace")

    def body_json(self) -> Any:
        """The body as JSON, None when it is not JSON (as a probe's body reads)."""
        if self._json is MISSING:
            try:
                self._json = orjson.loads(self._raw) if self._raw else None
            except orjson.JSONDecodeError:
                self._json = None
        return self._json


def judge(conditions: Sequence[Condition], result: CallResult) -> CallResult:
    """`result` as it is when it is not a 2xx or every condition holds; else failed for good."""
    if not result.ok or not conditions:
        return result
    answer = Answer(result)
    failing = []
    for condition in conditions:
        holds, seen = condition.check(answer)
        if not holds:
            failing.append(f"{condition.text} (got {seen})")
    if not failing:
        return result
    return replace(
        result,
        ok=False,
        retryable=False,
        error="expect " + "; ".join(failing),
        body=result.raw[:ERROR_BODY_BYTES].decode("utf-8", "replace") if result.raw else None,
    )
