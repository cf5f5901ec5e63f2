"""What the workflow stores keep: processes, their history, and published events.

These records are the stores' vocabulary (workflows/abc.py); the engine
mutates a live `Process` in place and hands it to `checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .states import FINAL, AttemptKind, AttemptOutcome, BranchState, ProcessStatus

if TYPE_CHECKING:  # abc.py imports this module
    from .abc import NewTask, TaskRecord


@dataclass(slots=True, kw_only=True)
class Attempt:
    """One line of a process's history."""

    step: str
    kind: AttemptKind
    attempt: int
    started_at: float
    ended_at: float
    outcome: AttemptOutcome
    error: str | None = None
    instance: str | None = None
    http_status: int | None = None
    signalled_by: str | None = None  # a `wait_for: {signal}` step's: who sent the signal

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "kind": self.kind,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "error": self.error,
            "instance": self.instance,
            "http_status": self.http_status,
            "signalled_by": self.signalled_by,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEnd:
    """A worker's answer to a task's open claim, handed to the runner so the step's
    checkpoint writes it: the task row ends in the same commit as the process row."""

    delivery: str
    state: str  # TaskState: done or failed
    output: Any = None
    error: str | None = None
    retryable: bool = False
    ended_at: float = 0.0
    # Called by the checkpoint that wrote it, once committed: the worker gets its 2xx.
    written: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOpen:
    """The next step's task, opened by the checkpoint that ends the step before it (one
    commit, not two); claimed at once for `claim_for` (lease from `now`) when a long poll
    waits (`clock` is given). `opened` gets the task as stored once that commit is done."""

    task: NewTask
    claim_for: str | None = None
    clock: Callable[[], float] | None = field(default=None, compare=False, repr=False)
    opened: Callable[[TaskRecord, bool], None] = field(compare=False, repr=False)

    @property
    def now(self) -> float | None:
        """When the claim starts, None: created due. Read as each write of the checkpoint
        runs, so one retried after a storage outage leases from its commit: a lease that
        started at its first try might have passed before the worker gets the task."""
        return self.clock() if self.clock is not None else None


@dataclass(slots=True, kw_only=True)
class Branch:
    """A branch of a parallel step, checkpointed in its process's row (`branches`): the
    same counters as the main line (attempt, wake_at, wait_seq), plus where it ended."""

    state: BranchState = BranchState.RUNNING
    attempt: int = 0
    wake_at: float | None = None
    wait_seq: int | None = None
    waiting: bool = False  # its last checkpoint was a wait (a delay, a retry, an event, a task)
    finished: int | None = None  # 1, 2, ...: the order it ended in (compensation reverses it)
    compensated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "attempt": self.attempt,
            "wake_at": self.wake_at,
            "wait_seq": self.wait_seq,
            "waiting": self.waiting,
            "finished": self.finished,
            "compensated": self.compensated,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Branch:
        return cls(**{**data, "state": BranchState(data.get("state", BranchState.RUNNING))})


@dataclass(slots=True, kw_only=True)
class Process:
    """A process's checkpointed state (the row), plus its store sequence number."""

    id: str
    workflow: str
    status: ProcessStatus
    input: dict[str, Any]
    outputs: dict[str, Any]
    idempotency_key: str | None
    created_at: float
    updated_at: float
    finished_at: float | None = None
    deadline_at: float | None = None
    deadline_missed: bool = False
    position: int = 0
    attempt: int = 0
    wake_at: float | None = None
    wait_seq: int | None = None
    compensating_from: int | None = None
    cancel_requested: bool = False
    error: dict[str, Any] | None = None  # {step, message, status, body}: see `failure`
    output: Any = None  # the `output:` template, rendered at completion (None: every output)
    workflow_version: int = 1
    # The member key ("<replica_id>/<incarnation>") of the replica that runs it; its
    # checkpoints are fenced by it. None with one daemon (SQLite): nobody else can claim it.
    owner: str | None = None
    # Residency: the engine keeps in memory only processes due within its horizon
    # (workflows/engine.py). `due_at` is when it must be in memory again: its next timer
    # (a delay, a backoff, a wait's timeout) or its deadline; its last checkpoint's time
    # while it runs or waits on a task or a resource; None when only an event, a signal or
    # a cancel can wake it. Set by the runner before each checkpoint, written with it.
    due_at: float | None = None
    # The event its main line waits for: the topic, and the match as `match_key` gives it
    # (keys, match), so a publish finds the stored waiters it satisfies. None: no such wait.
    wait_topic: str | None = None
    wait_keys: str | None = None
    wait_match: str | None = None
    # Who started it (a token's name, "anonymous" when auth is off, "schedule", or
    # "event:<topic>" for an event's trigger) and who cancelled it through the API: names,
    # never tokens. None on rows stored before they were kept.
    started_by: str | None = None
    cancelled_by: str | None = None
    seq: int = 0
    history_count: int = 0
    pending: list[Attempt] = field(default_factory=list)  # history not yet written
    writing: list[Attempt] = field(default_factory=list)  # history a checkpoint is writing
    # Signals the next checkpoint consumes (deleted with it) and tasks' answers it writes
    # (with it): one per strand that ended since the last write, so a tuple each.
    taken_signals: tuple[int, ...] = ()
    task_ends: tuple[TaskEnd, ...] = ()
    task_open: TaskOpen | None = None  # the next step's task, opened by this checkpoint
    # Its definition has task steps (set by the runner, not stored): its final checkpoint
    # then cancels any of its tasks left open. Others skip that write.
    has_tasks: bool = False
    branches: dict[str, Branch] = field(default_factory=dict)  # parallel steps' branches

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow": self.workflow,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "deadline_at": self.deadline_at,
            "deadline_missed": self.deadline_missed,
            "error": self.error,
            "workflow_version": self.workflow_version,
            "started_by": self.started_by,
            "cancelled_by": self.cancelled_by,
        }

    @property
    def error_text(self) -> str | None:
        """The error as one line, as notifications and logs have always shown it."""
        if self.error is None:
            return None
        step, message = self.error.get("step"), self.error.get("message")
        return f"step {step}: {message}" if step else str(message)


@dataclass(slots=True)
class Strand:
    """A line of work in a process that the runner's step code runs on: the main line
    (`name` ""; its counters are the process's own) or a branch of a parallel step (its
    `Branch`). One shape for both, so delays, retries, tasks and waits are written once."""

    process: Process
    state: Process | Branch  # holds attempt, wake_at, wait_seq
    name: str = ""
    halted: bool = False  # a sibling branch failed for good: this one stops

    @property
    def key(self) -> str:
        """Its waits' key: the process id, or `<process id>/<branch>`."""
        return f"{self.process.id}/{self.name}" if self.name else self.process.id

    def stopped(self) -> bool:
        return self.process.cancel_requested or self.halted


def branches_json(branches: dict[str, Branch]) -> str | None:
    """The `branches` column: None for a process without parallel steps (no cost)."""
    if not branches:
        return None
    return orjson.dumps({name: b.to_json() for name, b in branches.items()}).decode()


def stored_branches(text: str | None) -> dict[str, Branch]:
    if not text:
        return {}
    return {name: Branch.from_json(data) for name, data in orjson.loads(text).items()}


def failure(
    step: str | None, message: str, status: int | None = None, body: str | None = None
) -> dict[str, Any]:
    """A process's `error` (DESIGN.md §3): the failing step, why, and what the service
    answered (its HTTP status and the first KiB of its body) when it answered."""
    return {"step": step, "message": message, "status": status, "body": body}


def stored_failure(text: str | None) -> dict[str, Any] | None:
    """The `error` column as written: JSON, or the plain text of rows before errors had
    a shape (`step pay: HTTP 503`), which becomes the message."""
    if text is None:
        return None
    if text.startswith("{"):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
    return failure(None, text)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredDefinition:
    """One version of a workflow definition as stored: its JSON entry and where it came
    from (`config` or `api`)."""

    name: str
    version: int
    source: str
    spec: dict[str, Any]
    defined_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Signal:
    """JSON sent to one process (`POST /v1/processes/{id}/signals/{name}`), kept until a
    `wait_for: {signal: name}` step takes it; `seq` orders and names it."""

    seq: int
    process: str
    name: str
    data: dict[str, Any]
    sent_at: float
    by: str | None = None  # who sent it (a token's name); the history row that takes it says


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """An event as stored: its id (the bus's sequence), topic, decoded data and time."""

    seq: int
    topic: str
    data: dict[str, Any]
    published_at: float
    actor: str | None = None  # who published it (a token's name); None: the daemon, or older


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to store with the processes it starts."""

    seq: int  # the bus reserved it: stored and live events share one id sequence
    topic: str
    data: bytes  # JSON, encoded once at publish: the stored row is the event as published
    key: str
    published_at: float
    actor: str | None = None  # who published it: a token's name, "anonymous"
    # The stored matches (records.match_key) of waiters it satisfies: the write makes them
    # due at once, so a crash before they take it cannot leave them waiting as rows.
    wakes: tuple[str, ...] = ()


@dataclass(slots=True)
class Staged:
    """What a checkpoint takes out of its process to write (the stores' shared
    bookkeeping). They leave the process before the write, so a checkpoint made meanwhile
    (a cancel's) does not write them again; until the commit the history rows are in
    `process.writing`, which reads show. A refused write puts all of it back for the retry
    (no row lost, no signal taken twice)."""

    history: list[Attempt]
    taken: tuple[int, ...]
    ends: tuple[TaskEnd, ...]
    opening: TaskOpen | None
    first: int | None  # the first row's number; None (branches): numbered inside the write

    @classmethod
    def take(cls, process: Process) -> Staged:
        history, process.pending = process.pending, []
        process.writing += history
        taken, process.taken_signals = process.taken_signals, ()
        ends, process.task_ends = process.task_ends, ()
        opening, process.task_open = process.task_open, None
        first = process.history_count if not process.branches else None
        process.history_count += len(history)
        return cls(history, taken, ends, opening, first)

    def put_back(self, process: Process) -> None:
        """The write was refused: the retry (or the next checkpoint) writes it all."""
        self._not_in_flight(process)
        process.pending[:0] = self.history
        process.history_count -= len(self.history)  # not `= first`: another may have failed
        process.taken_signals = self.taken + process.taken_signals  # with any taken since
        process.task_ends = self.ends + process.task_ends
        if self.opening is not None and process.task_open is None:
            process.task_open = self.opening

    def written(self, process: Process, opened: tuple[Any, bool] | None) -> None:
        """The write committed: the answers it wrote are told, the task it opened handed."""
        self._not_in_flight(process)
        for end in self.ends:
            end.written()
        if self.opening is not None and opened is not None:
            self.opening.opened(*opened)

    def _not_in_flight(self, process: Process) -> None:
        if len(process.writing) == len(self.history):  # the usual: no other in flight
            process.writing = []
        elif self.history:
            ours = {id(attempt) for attempt in self.history}
            process.writing = [a for a in process.writing if id(a) not in ours]


def match_key(match: Mapping[str, Any]) -> tuple[str, str]:
    """A `wait_for` step's rendered match as stored: (its keys, itself), both JSON with
    sorted keys. `projection(keys, event)` equals the second whenever the event matches
    (waits.matches: each key's value equal, as Python's == says; a missing key reads as
    null). Rarely also when it does not (a string that reads as a huge number): that
    only brings the row back, and the step looks at the event itself."""
    keys = orjson.dumps(sorted(match)).decode()
    return keys, _json({str(k): v for k, v in match.items()})


def projection(keys: str, data: Mapping[str, Any]) -> str:
    """An event's data on a stored match's keys, as `match_key` writes a match."""
    return _json({k: data.get(k) for k in orjson.loads(keys)})


def _json(value: dict[str, Any]) -> str:
    return orjson.dumps(_canonical(value), option=orjson.OPT_SORT_KEYS).decode()


def _canonical(value: Any) -> Any:
    """A value written as == compares it: True and False as 1 and 0, a whole float as
    the int it equals (5.0 == 5), an int past 64 bits as its digits; inside lists and
    objects too."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value
