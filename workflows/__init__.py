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

__all__ = [
    "Call",
    "Definition",
    "DefinitionError",
    "Publish",
    "Retry",
    "Step",
    "WaitFor",
    "Workflow",
    "call",
    "publish",
    "wait_for",
]
