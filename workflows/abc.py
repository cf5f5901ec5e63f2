"""The interfaces of the workflow stores; `stores/sqlite.py` implements both.

Narrow on purpose (today's calls, nothing more), so another store (issue 17:
PostgreSQL, for several replicas) can stand in. Writes that cannot be made
raise `registry.StoreUnavailable`; the engine waits those out.
"""

from __future__ import annotations

from typing import Protocol

from .records import Attempt, NewEvent, Process, Signal, StoredDefinition, StoredEvent
from .states import ProcessStatus


class ProcessStore(Protocol):
    """Processes and their history: the engine's checkpoints."""

    async def create_tables(self) -> None:
        """Make the store ready; safe to call on a store made ready before."""

    async def create(
        self, processes: list[Process], event: NewEvent | None
    ) -> tuple[list[tuple[Process, bool]], int | None]:
        """Insert new processes and the event that started them, in one transaction.

        A process whose (workflow, idempotency_key) exists is not inserted: the stored
        one comes back in its place, marked not new. An event whose key exists is not
        stored twice (the second value is then None, else the event's seq)."""
        ...

    async def checkpoint(self, process: Process) -> None:
        """Store the process and its `pending` history (then emptied), atomically."""

    async def unfinished(self) -> list[Process]:
        """Every process not finished, oldest first, with its history count."""
        ...

    async def add_signal(self, process_id: str, name: str, data: bytes, at: float) -> Signal:
        """Keep a signal for a process (durable when this returns); a checkpoint whose
        process has `taken_signal` set deletes that one in the same transaction."""
        ...

    async def pending_signals(self) -> list[Signal]:
        """Signals not yet taken by unfinished processes, oldest first."""
        ...

    async def get(self, process_id: str) -> tuple[Process, list[Attempt]] | None: ...

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
    ) -> list[tuple[int, str, bytes, float]]:
        """Events with `seq < id <= upto`, oldest first, as (id, topic, JSON, time)."""
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

    async def add_definition(self, definition: StoredDefinition) -> None:
        """Store a new version (durable when this returns)."""


class WorkflowStore(ProcessStore, EventStore, DefinitionStore, Protocol):
    """All three, in one store: an event and the processes it starts are one transaction."""
