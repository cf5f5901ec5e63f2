"""Writes that ride in the transaction of the next write a request makes.

The audit trail records a change in the same transaction as the change (DESIGN §3): a
crash keeps both or neither. The change is written deep in a store (the registry's,
the engine's) that knows nothing of who asked; the request knows who asked and nothing of
the store. So the request leaves a rider here (`mount`), and the next write its task
submits, on either database, takes it (`carried`); the rider is written after that write,
in its transaction (at the batch's end, `run_batch`, with the batch's other riders). A
request whose change writes nothing (an unchanged re-registration, a start with a known
idempotency key) leaves its rider unwritten: there was no change.

The rider lives in a context variable, set for the length of one request (`mount`): each
request of a keep-alive connection runs in the same task, so it is reset after each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar, Token
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Rider(Protocol):
    def write(self, conn: Any) -> None:
        """Run inside the carrying write's transaction, on the database's thread."""
        ...

    def write_all(self, conn: Any, riders: Sequence[Rider]) -> None:
        """Write `riders` (this one's kind, this one among them) at once, at the end of
        their batch's transaction: one round trip for a batch's records (PostgreSQL)."""
        ...


class Ordered:
    """A write whose rows must commit in the order they take their ids (a log read by cursor:
    the audit trail). On PostgreSQL a sequence hands ids out at INSERT, and a batch of one
    replica may commit after a later id of another's was read: the cursor would pass the
    earlier one for good. So a batch holding such a write first takes `lock` (an advisory
    lock held to its COMMIT, PgDatabase): such batches commit one at a time, in id order.
    First, before any row: taken later, two replicas' batches could each hold what the
    other awaits. One daemon on SQLite writes one batch at a time anyway."""

    __slots__ = ("fn", "lock")

    def __init__(self, fn: Callable[[Any], Any], lock: str) -> None:
        self.fn, self.lock = fn, lock

    def __call__(self, conn: Any) -> Any:
        return self.fn(conn)


def locks(fns: Iterable[Callable[[Any], Any]]) -> list[str]:
    """The locks a batch of writes must take before its first one, in one order."""
    return sorted({fn.lock for fn in fns if isinstance(fn, Ordered) and fn.lock})


class _Seat:
    """A rider and the one task whose write may carry it: a task the request started (a
    probe, a process's run) copies its context, but writes something else, elsewhere."""

    __slots__ = ("committed", "rider", "task")

    def __init__(
        self, rider: Rider, task: asyncio.Task[Any] | None, committed: Callable[[], None] | None
    ) -> None:
        self.rider: Rider | None = rider
        self.task = task
        self.committed = committed


_SEAT: ContextVar[_Seat | None] = ContextVar("hms_rider", default=None)


Mounted = Token[_Seat | None]


def mount(rider: Rider, committed: Callable[[], None] | None = None) -> Mounted:
    """`rider` goes with the next write this task submits, until `unmount` (in a
    `finally`: a keep-alive connection's next request runs in the same task).
    `committed` is called on the loop once that write and its rider are committed
    (`settled`), whatever the request does next: it may wait, fail or be gone by then."""
    return _SEAT.set(_Seat(rider, asyncio.current_task(), committed))


def unmount(mounted: Mounted) -> None:
    _SEAT.reset(mounted)


class Carried(Ordered):
    """A write and the rider it carries: called, both in turn; in a batch (`run_batch`),
    the write now and its rider with the batch's others at the end."""

    __slots__ = ("committed", "rider")

    def __init__(
        self, fn: Callable[[Any], Any], rider: Rider, committed: Callable[[], None] | None = None
    ) -> None:
        super().__init__(fn, getattr(rider, "lock", ""))
        self.rider, self.committed = rider, committed

    def __call__(self, conn: Any) -> Any:
        result = self.fn(conn)
        self.rider.write(conn)
        return result


def carried(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """`fn`, then the pending rider in the same transaction (taken: it rides once)."""
    seat = _SEAT.get()
    if seat is None or seat.rider is None or seat.task is not asyncio.current_task():
        return fn
    rider, seat.rider = seat.rider, None
    return Carried(fn, rider, seat.committed)


def settled(fn: Callable[[Any], Any]) -> None:
    """`fn` (as submitted) and its rider are committed: tell the rider's mounter. On the
    loop, from the database's settling of the batch; never raises."""
    if isinstance(fn, Carried) and fn.committed is not None:
        try:
            fn.committed()
        except Exception:
            log.exception("a committed rider's announcement failed")


def run_batch(conn: Any, fns: Sequence[Callable[[Any], Any]]) -> list[tuple[bool, Any]]:
    """Each write of a batch, then its riders, a kind at a time (`Rider.write_all`): the
    caller's transaction holds them all, so a record still commits with its change."""
    outcomes: list[tuple[bool, Any]] = []
    riders: dict[type, list[Rider]] = {}
    for fn in fns:
        if isinstance(fn, Carried):
            outcomes.append((True, fn.fn(conn)))
            riders.setdefault(type(fn.rider), []).append(fn.rider)
        else:
            outcomes.append((True, fn(conn)))
    for kind in riders.values():
        kind[0].write_all(conn, kind)
    return outcomes


def dismount() -> None:
    """This task's pending rider will not ride (its record is being written by itself)."""
    seat = _SEAT.get()
    if seat is not None and seat.task is asyncio.current_task():
        seat.rider = None
