"""The states a process, a step and an attempt can be in.

Every enum here is a `StrEnum` whose values are the strings the daemon has
always written: SQLite stores them as TEXT, orjson and Jinja write the value,
metric labels carry it. Rows are read back as `ProcessStatus(row[i])`.
One caveat: orjson refuses a `StrEnum` as a dict *key*; a dict keyed by
status that goes on the wire uses `.value` (or the plain `STATUSES` tuple).
"""

from __future__ import annotations

import enum


class ProcessStatus(enum.StrEnum):
    """Where a process is; the order is the one the API and the page list them in."""

    STARTED = "started"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"


FINAL = frozenset(
    {
        ProcessStatus.COMPLETED,
        ProcessStatus.FAILED,
        ProcessStatus.COMPENSATED,
        ProcessStatus.CANCELLED,
    }
)
ACTIVE = frozenset(ProcessStatus) - FINAL
# Plain strings, in listing order: safe as dict keys for orjson (see the module docstring).
STATUSES: tuple[str, ...] = tuple(status.value for status in ProcessStatus)


class StepKind(enum.StrEnum):
    """What a step does; a definition's `Step.kind`."""

    CALL = "call"
    PUBLISH = "publish"
    WAIT_FOR = "wait_for"
    TASK = "task"
    PARALLEL = "parallel"


class AttemptKind(enum.StrEnum):
    """What a line of a process's history records: a step's kind, or its compensation."""

    CALL = "call"
    PUBLISH = "publish"
    WAIT_FOR = "wait_for"
    TASK = "task"
    PARALLEL = "parallel"  # a skipped parallel step's history line
    COMPENSATE = "compensate"


class AttemptOutcome(enum.StrEnum):
    """How an attempt ended; also the `outcome` label of the attempt metrics."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"  # the step's `when` did not hold: it did not run


class StepState(enum.StrEnum):
    """A step's state as `describe` shows it, steps not yet run included."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATED = "compensated"


class BranchState(enum.StrEnum):
    """Where a branch of a parallel step is, as its process's row keeps it."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"  # stopped: a sibling failed for good, or the process was cancelled


class WaitKind(enum.StrEnum):
    """What a waiting process waits for (DESIGN.md §3)."""

    DELAY = "delay"
    RETRY = "retry"
    EVENT = "event"
    TASK = "task"
    SIGNAL = "signal"
    RESOURCE = "resource"  # units of a resource, held by others (workflows/resources.py)


class TaskState(enum.StrEnum):
    """Where a task (one attempt of a task step, workflows/tasks.py) is: `due` until a
    worker claims it, `claimed` while its lease runs, then one of the final four."""

    DUE = "due"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"  # the lease passed without an answer: a timed-out attempt
    CANCELLED = "cancelled"  # its process was cancelled while it was open
