"""hms_mgmt: the Python SDK of hms-mgmt (DESIGN.md §7), over its HTTP API (§3) and aiohttp only."""

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
from .worker import Worker
from .workflow import (
    Call,
    DefinitionError,
    Publish,
    Retry,
    Task,
    WaitFor,
    Workflow,
    call,
    publish,
    task,
    wait_for,
)

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Call",
    "Client",
    "Conflict",
    "DefinitionError",
    "Duration",
    "Event",
    "HmsError",
    "NonRetryable",
    "NotFound",
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
    "call",
    "publish",
    "registration_ctx",
    "task",
    "wait_for",
]
