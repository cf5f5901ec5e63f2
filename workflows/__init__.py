"""What runs across the services: workflow definitions and the durable engine."""

from scheduler.retry import Retry

from .definition import (
    Call,
    Definition,
    DefinitionError,
    Publish,
    Step,
    WaitFor,
    Workflow,
    call,
    publish,
    wait_for,
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
    "DefinitionError",
    "ProcessStatus",
    "Publish",
    "Retry",
    "Step",
    "StepKind",
    "StepState",
    "WaitFor",
    "WaitKind",
    "Workflow",
    "call",
    "publish",
    "wait_for",
]
