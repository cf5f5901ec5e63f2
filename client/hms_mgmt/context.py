"""What a step function gets (StepContext) and may raise (NonRetryable)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class StepContext:
    """One attempt of a task step (or its compensation), as the daemon delivered it.

    `idempotency_key` is `<process id>/<step>` (`<process id>/<step>.compensate` for a
    compensation) and stays the same on every attempt and redelivery: a function with
    side effects passes it on (an Idempotency-Key header, a unique column) so that
    at-least-once delivery never does the work twice."""

    input: Mapping[str, Any]
    steps: Mapping[str, Any]
    process_id: str
    step: str
    attempt: int
    idempotency_key: str
    task: str = ""
    workflow: str = ""


class NonRetryable(Exception):
    """Raised by a step function: the attempt fails for good, whatever the retry policy."""
