"""The service registry: who is out there, at which URL, under which lease."""

from registry.abc import RegistryStore
from registry.stores.sqlite import SqliteRegistryStore, Transactor

from .catalog import Catalog, Clock, HealthSource, InstanceStatus, SystemClock
from .changes import Change, ChangeKind
from .conditions import (
    Condition,
    ConditionError,
    parse_condition,
    parse_conditions,
    parse_context_condition,
)
from .durations import format_duration, parse_duration
from .errors import Conflict, Overloaded, RegistryError, StoreUnavailable, UnknownInstance
from .model import (
    Duration,
    HealthState,
    HttpUrl,
    Instance,
    Name,
    ProbeSpec,
    ProbeType,
    RegistrationBody,
    Tags,
)

__all__ = [
    "Catalog",
    "Change",
    "ChangeKind",
    "Clock",
    "Condition",
    "ConditionError",
    "Conflict",
    "Duration",
    "HealthSource",
    "HealthState",
    "HttpUrl",
    "Instance",
    "InstanceStatus",
    "Name",
    "Overloaded",
    "ProbeSpec",
    "ProbeType",
    "RegistrationBody",
    "RegistryError",
    "RegistryStore",
    "SqliteRegistryStore",
    "StoreUnavailable",
    "SystemClock",
    "Tags",
    "Transactor",
    "UnknownInstance",
    "format_duration",
    "parse_condition",
    "parse_conditions",
    "parse_context_condition",
    "parse_duration",
]
