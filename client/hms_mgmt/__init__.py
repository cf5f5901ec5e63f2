"""hms_mgmt: the Python SDK of hms-mgmt (DESIGN.md §7), over its HTTP API (§3) and aiohttp only."""

from typing import TYPE_CHECKING, Any

from .client import Client, Event, ProcessHandle, Report, RoundRobin
from .context import NonRetryable, StepContext
from .durations import Duration
from .errors import (
    BadRequest,
    Conflict,
    HmsError,
    NotFound,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from .registration import Registration, Rejected, registration_ctx
from .sync import SyncClient, SyncProcessHandle
from .workflow import (
    Acquire,
    Branch,
    Call,
    DefinitionError,
    Parallel,
    Publish,
    Retry,
    Task,
    WaitFor,
    Workflow,
    acquire,
    call,
    parallel,
    publish,
    step,
    task,
    wait_for,
)

if TYPE_CHECKING:
    from .worker import Worker

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Worker on first use: `python -m hms_mgmt.worker` then runs a module not yet imported."""
    if name == "Worker":
        from .worker import Worker

        return Worker
    raise AttributeError(f"module 'hms_mgmt' has no attribute {name!r}")


__all__ = [
    "Acquire",
    "BadRequest",
    "Branch",
    "Call",
    "Client",
    "Conflict",
    "DefinitionError",
    "Duration",
    "Event",
    "HmsError",
    "NonRetryable",
    "NotFound",
    "Parallel",
    "ProcessHandle",
    "Publish",
    "Registration",
    "Rejected",
    "Report",
    "Retry",
    "RoundRobin",
    "StepContext",
    "SyncClient",
    "SyncProcessHandle",
    "Task",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "WaitFor",
    "Worker",
    "Workflow",
    "__version__",
    "acquire",
    "call",
    "parallel",
    "publish",
    "registration_ctx",
    "step",
    "task",
    "wait_for",
]
