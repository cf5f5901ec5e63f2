"""What runs across the services: workflow definitions and the durable engine."""

from scheduler.retry import Retry

from .definition import (
    Call,
    Definition,
    Publish,
    Step,
    WaitFor,
)
from .states import (
    ACTIVE,
    FINAL,
    STATUSES,
    AttemptKind,
    AttemptOutcome,
    ProcessStatus,
    StepKind,
    StepState,
    WaitKind,
)

__all__ = [
    "ACTIVE",
    "FINAL",
    "STATUSES",
    "AttemptKind",
    "AttemptOutcome",
    "Call",
    "Definition",
    "ProcessStatus",
    "Publish",
    "Retry",
    "Step",
    "StepKind",
    "StepState",
    "WaitFor",
    "WaitKind",
]
