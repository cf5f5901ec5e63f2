"""The registry's refusals and the storage failures every store raises: plain exceptions.

The HTTP edge maps each to a status and an error code in one table
(monitor/http/errors.py STATUS); nothing below it knows about HTTP.
"""

from __future__ import annotations


class RegistryError(Exception):
    """A registry operation refused."""


class UnknownInstance(RegistryError, LookupError):
    """No such service or instance."""


class Conflict(RegistryError):
    """The change contradicts what is registered (a static instance, a changed lease)."""


class StoreUnavailable(Exception):
    """The change could not be made durable, so it was not made at all."""


class Overloaded(StoreUnavailable):
    """Too many changes are waiting for the disk: this one was refused before queueing."""
