"""The interfaces of the workflow stores; `stores/sqlite.py` implements the process and
event stores, `stores/sqlite_tasks.py` the task store, `stores/sqlite_resources.py` the
resource store.

Narrow on purpose (today's calls, nothing more), so another store (issue 17:
PostgreSQL, for several replicas) can stand in. Writes that cannot be made
raise `registry.StoreUnavailable`; the engine waits those out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .records import Attempt, NewEvent, Process, Signal, StoredDefinition, StoredEvent
from .states import ProcessStatus, TaskState


class ProcessStore(Protocol):
    """Processes and their history: the engine's checkpoints."""

    async def create_tables(self) -> None:
        """Make the store ready; safe to call on a store made ready before."""

    async def create(
        self,
        processes: list[Process],
        event: NewEvent | None,
        *,
        schedule: ScheduleMark | None = None,
    ) -> tuple[list[tuple[Process, bool]], int | None]:
        """Insert new processes and the event that started them, in one transaction.

        A process whose (workflow, idempotency_key) exists is not inserted: the stored
        one comes back in its place, marked not new. An event whose key exists is not
        stored twice (the second value is then None, else the event's seq). A schedule's
        tick (`ScheduleStore`) is marked in the same transaction as the process it starts."""
        ...

    async def checkpoint(self, process: Process) -> None:
        """Store the process and its `pending` history (then emptied), atomically, with
        its `task_ends` (workers' answers ending their tasks' open claims). Concurrent
        checkpoints of a process (its branches') never give two rows one number.

        Fenced by `process.owner`: when the stored row names another owner (a replica
        claimed it meanwhile), nothing is written and `workflows.errors.Fenced` is raised.
        The owner is written by `create` and `claim_orphans` only, never by a checkpoint."""

    async def claim_orphans(
        self, owner: str, dead_owners: Sequence[str], limit: int
    ) -> list[Process]:
        """Take over up to `limit` unfinished processes owned by `dead_owners` (members
        whose lease lapsed), oldest first: each becomes `owner`'s and comes back with its
        history count, to resume. Claimers at once never take one process twice; a process
        being checkpointed by its old owner is left for the next call (PostgreSQL: `FOR
        UPDATE SKIP LOCKED`), and that owner's later checkpoints are fenced."""
        ...

    async def unfinished(self) -> list[Process]:
        """Every process not finished, oldest first, with its history count."""
        ...

    async def take_over(self, owner: str, due_before: float, updated_after: float) -> int:
        """The unfinished processes another engine may hold in memory become `owner`'s (a
        new leader's): those due by `due_before`, and those due on no timer written since
        `updated_after`; how many changed hands (those already `owner`'s are not counted).
        A checkpoint of the old owner under way is waited for; its later ones are fenced.
        The others become `owner`'s as `due` and `unfinished_of` read them."""
        ...

    async def due(
        self,
        after: tuple[float, int] | None,
        before: float,
        limit: int,
        owner: str | None = None,
    ) -> list[Process]:
        """Unfinished processes with `due_at <= before` and `(due_at, seq) > after` (no
        lower bound when None), by (due_at, seq), at most `limit`, with their history
        counts: what the engine loads into memory (at open, and as its horizon moves).
        A process whose due_at is None is never among them. `owner`: they become its, as
        read after any checkpoint of theirs under way (another's later ones are fenced)."""
        ...

    async def unfinished_of(self, ids: Sequence[str], owner: str | None = None) -> list[Process]:
        """Those of `ids` that are unfinished, with their history counts (a cancel, a
        signal or an event for a process not in memory loads it); `owner` as for `due`."""
        ...

    async def unfinished_of_version(self, workflow: str, version: int) -> list[str]:
        """Ids of the unfinished processes of one version of a workflow (one that no
        longer loads: the engine fails them at open, in memory or not)."""
        ...

    async def waiting_keys(self) -> list[tuple[str, str]]:
        """The distinct (wait_topic, wait_keys) of unfinished processes."""
        ...

    async def waiters(self, topic: str, match: str, limit: int) -> list[str]:
        """Ids of up to `limit` unfinished processes waiting for `topic` whose stored
        `wait_match` is `match` (records.projection of the event on their keys, as
        `waiting_keys` gives them: `match` names its keys, so their `wait_keys` too)."""
        ...

    async def add_signal(
        self, process_id: str, name: str, data: bytes, at: float, by: str | None = None
    ) -> Signal:
        """Keep a signal for a process (durable when this returns), sent `by` (a token's
        name); a checkpoint whose process has it in `taken_signals` deletes it in the same
        transaction."""
        ...

    async def pending_signals(self) -> list[Signal]:
        """Signals not yet taken by unfinished processes, oldest first."""
        ...

    async def get(self, process_id: str) -> tuple[Process, list[Attempt]] | None: ...

    async def by_key(self, workflow: str, idempotency_key: str) -> Process | None:
        """The process `workflow` started with that idempotency key, if any (a read)."""
        ...

    async def page(
        self, workflow: str | None, status: ProcessStatus | None, limit: int, before: int | None
    ) -> list[Process]:
        """Newest first; `before` is the cursor (a process's `seq`)."""
        ...

    async def counts(self) -> dict[tuple[str, ProcessStatus], int]: ...

    async def outcomes(self, workflow: str, since: float) -> list[tuple[int, int, int]]:
        """(minute, good, valid) per minute for the workflow SLO."""
        ...

    async def prune(
        self, before: float, events_before: float
    ) -> dict[tuple[str, ProcessStatus], int]:
        """Forget processes finished before `before` and events published before
        `events_before`; returns the processes that went, counted."""
        ...


class EventStore(Protocol):
    """Published events, read back for waiting processes and SSE replay."""

    async def events_since(self, topic: str, seq: int) -> list[StoredEvent]:
        """Events of `topic` with a seq above `seq`, oldest first."""
        ...

    async def events_after(
        self, seq: int, upto: int, limit: int
    ) -> list[tuple[int, str, bytes, float, str | None]]:
        """Events with `seq < id <= upto`, oldest first, as (id, topic, JSON, time, actor)."""
        ...

    async def last_event_seq(self) -> int:
        """The highest event id ever stored, pruned or not."""
        ...


class DefinitionStore(Protocol):
    """Every version of every workflow definition, config or API, so a process runs the
    version it started with across restarts."""

    async def definitions(self) -> list[StoredDefinition]:
        """Every stored version, oldest first."""
        ...

    async def add_definitions(self, definitions: list[StoredDefinition]) -> list[int]:
        """Store new versions, all or none (durable when this returns); each gets the next
        version of its name, allocated in the write (its `version` is ignored), and the
        versions are returned in order."""


class WorkflowStore(ProcessStore, EventStore, DefinitionStore, Protocol):
    """All three, in one store: an event and the processes it starts are one transaction."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTask:
    """One attempt of a task step (or of a task compensation), as the runner opens it."""

    process: str
    key: str  # the idempotency key: `<process>/<step>`, or `<process>/<step>.compensate`
    attempt: int  # the runner's attempt number: (key, attempt) names the task
    queue: str
    lease: float  # seconds a claim holds without a heartbeat (the step's timeout)
    payload: bytes  # the JSON a poll hands out, but for `id` and `deadline`
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """A task as stored; `delivery` names its claim, the only one a worker may answer."""

    seq: int
    process: str
    key: str
    attempt: int
    queue: str
    state: TaskState
    lease: float
    payload: bytes
    delivery: str | None = None
    worker: str | None = None
    lease_until: float | None = None
    output: Any = None
    error: str | None = None
    retryable: bool = True


# Why a complete, fail or heartbeat changed nothing: no such delivery ever, or one that is
# no longer the open claim of its task (reassigned after its lease, answered, cancelled).
Refusal = Literal["unknown", "stale"]


class TaskStore(Protocol):
    """Task steps waiting for workers: created by the runner, claimed by polls, answered
    by delivery id. Every method is one statement, so claims stay correct with several
    daemons on one database (PostgreSQL: `FOR UPDATE SKIP LOCKED` in the claim)."""

    async def create_tables(self) -> None:
        """Make the store ready; safe to call on a store made ready before."""

    async def open(
        self, task: NewTask, *, claim_for: str | None = None, now: float | None = None
    ) -> tuple[TaskRecord, bool]:
        """The task for (key, attempt), and whether it is new: created due, or claimed at
        once (for worker `claim_for`, lease from `now`) when `now` is given, as a long poll
        waits for it; else the stored one as it now is (a resumed process finds its task
        again, never a second one)."""
        ...

    async def release(self, delivery: str) -> TaskRecord | None:
        """Undo a claim nobody received (its poll went away): the task is due again."""
        ...

    async def claim(
        self, queue: str, worker: str | None, limit: int, now: float
    ) -> list[TaskRecord]:
        """Claim up to `limit` due tasks of `queue`, oldest first, each with a new delivery
        id and a lease ending `now` + its lease."""
        ...

    async def complete(self, delivery: str, output: Any, now: float) -> TaskRecord | Refusal:
        """Finish the task of an open claim with `output` (JSON)."""
        ...

    async def fail(
        self, delivery: str, error: str, retryable: bool, now: float
    ) -> TaskRecord | Refusal:
        """Finish the task of an open claim as failed."""
        ...

    async def heartbeat(self, delivery: str, now: float) -> TaskRecord | Refusal:
        """Renew an open claim's lease: it ends `now` + the task's lease."""
        ...

    async def expire(self, delivery: str, now: float) -> TaskRecord | None:
        """End a claim whose lease ends no later than `now` (`expired`); None when it is
        no longer open or a heartbeat moved its lease past `now`."""
        ...

    async def cancel(self, key: str, attempt: int, now: float) -> TaskRecord | None:
        """Cancel the task while open (due or claimed); else the task as it ended, None
        when there is none."""
        ...

    async def queue_of(self, delivery: str) -> str | None:
        """The queue of the task a delivery id was given for; None: never given."""
        ...

    async def depths(self) -> dict[str, int]:
        """Due tasks per queue."""
        ...

    async def prune(self, before: float) -> int:
        """Forget tasks that ended before `before`; how many went."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """One process's request for units of a resource at one of its steps: `held` once
    granted, else waiting; `seq` is its place in the queue (requests are served in it)."""

    process: str
    step: str
    resource: str
    key: str | None  # the rendered `acquire.key`; None: the resource's one global pool
    units: int
    seq: int
    held: bool


class ResourceStore(Protocol):
    """Holds and waiters of resources (workflows/resources.py), so a restart neither leaks
    a unit nor grants one twice, and waiters keep their order. One row per (process,
    step): a step run again (a retry, a resume) never reserves twice."""

    async def create_tables(self) -> None:
        """Make the store ready; safe to call on a store made ready before."""

    async def holds(self) -> list[Hold]:
        """Every row, held and waiting, in `seq` order."""
        ...

    async def wait(self, hold: Hold) -> None:
        """Keep a waiting request (durable when this returns); a row of the same (process,
        step) stays as it is, so a grant written first is not taken back."""

    async def settle(
        self,
        *,
        released: Sequence[str] = (),
        left: Sequence[tuple[str, str]] = (),
        granted: Sequence[Hold] = (),
        capacities: Mapping[str, int] | None = None,
    ) -> None:
        """One transaction: every row of the `released` processes goes, the (process, step)
        rows of `left` go, and `granted` are stored held (inserted, or a waiting row
        turned held). A handover is one small write.

        With `capacities` (resource -> units: replicas sharing the table each grant from
        their own memory), each grant of a listed resource is checked against the table:
        the units held in its (resource, key) by other rows, plus its own, must fit, checked
        one grant after another across stores. When one does not fit, nothing is written
        and `Overbooked` names the grants that did not fit."""


class Overbooked(Exception):
    """A grant (`ResourceStore.settle`) found its units held already (by another replica's
    grant): the settle wrote nothing; `holds` are the grants that did not fit."""

    def __init__(self, holds: Sequence[Hold]) -> None:
        names = ", ".join(f"{h.process}/{h.step} ({h.units} of {h.resource})" for h in holds)
        super().__init__(f"no room left for {names}")
        self.holds = list(holds)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleMark:
    """How far a workflow's schedule has been served: every tick up to `tick` (epoch
    seconds) has started its process, or was not owed (the schedule was armed after it).
    Kept with the schedule it was for: another schedule does not inherit its ticks."""

    workflow: str
    cron: str
    timezone: str
    tick: float


class ScheduleStore(Protocol):
    """Schedule marks (workflows/schedules.py): what a restart needs to know which tick
    was missed while the daemon was down. `ProcessStore.create(..., schedule=mark)` moves
    a mark with the process its tick starts; these keep the rest."""

    async def create_tables(self) -> None:
        """Make the store ready; safe to call on a store made ready before."""

    async def marks(self) -> list[ScheduleMark]:
        """Every workflow's mark."""
        ...

    async def mark(self, mark: ScheduleMark) -> None:
        """Store the mark of `mark.workflow` (replacing its last), durable when this
        returns."""

    async def forget(self, workflow: str) -> None:
        """The workflow has no schedule any more: its mark goes."""
