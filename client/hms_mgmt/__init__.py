"""hms_mgmt: the Python SDK of hms-mgmt (DESIGN.md §7), over its HTTP API (§3) and aiohttp only."""

from .client import Client, Event, ProcessHandle, Report, RoundRobin
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

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Client",
    "Conflict",
    "Duration",
    "Event",
    "HmsError",
    "NotFound",
    "ProcessHandle",
    "Registration",
    "Rejected",
    "Report",
    "RoundRobin",
    "SyncClient",
    "SyncProcessHandle",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "__version__",
    "registration_ctx",
]
