"""hms_mgmt: the Python SDK of hms-mgmt (DESIGN.md §7), over its HTTP API (§3) and aiohttp only."""

from .durations import Duration
from .errors import BadRequest, Conflict, HmsError, NotFound, Unauthorized, Unavailable
from .registration import Registration, Rejected, registration_ctx

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Conflict",
    "Duration",
    "HmsError",
    "NotFound",
    "Registration",
    "Rejected",
    "Unauthorized",
    "Unavailable",
    "__version__",
    "registration_ctx",
]
