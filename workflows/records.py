"""What the workflow stores keep: processes, their history, and published events.

These records are the stores' vocabulary (workflows/abc.py); the engine
mutates a live `Process` in place and hands it to `checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .states import FINAL, AttemptKind, AttemptOutcome, ProcessStatus


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
        }


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
    error: str | None = None
    seq: int = 0
    history_count: int = 0
    pending: list[Attempt] = field(default_factory=list)  # history not yet written

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
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """An event as stored: its id (the bus's sequence), topic, decoded data and time."""

    seq: int
    topic: str
    data: dict[str, Any]
    published_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to store with the processes it starts."""

    seq: int  # the bus reserved it: stored and live events share one id sequence
    topic: str
    data: bytes  # JSON, encoded once at publish: the stored row is the event as published
    key: str
    published_at: float
