"""What runs across the services: workflow definitions, the durable engine, its routes."""

from .definition import (
    Call,
    Definition,
    DefinitionError,
    Publish,
    Retry,
    Step,
    WaitFor,
    Workflow,
    call,
    from_config,
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
    "from_config",
    "publish",
    "wait_for",
]
