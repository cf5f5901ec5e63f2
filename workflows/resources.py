"""Resources: named capacities that steps reserve before they run (DESIGN.md §2 `acquire`).

A step with `acquire: {resource, units, key}` reserves `units` of the resource
before it runs (before its delay) and its process holds them until it ends,
whatever the end (completed, failed, compensated, cancelled). With a `key` (a
template, e.g. `{input.parent_id}`) the capacity applies per rendered value:
one payment at a time per parent. A request that does not fit waits in FIFO
order per (resource, key): a later small request never overtakes an earlier
one that does not fit yet, so no request starves.

Memory is the authority while the daemon runs (one daemon per file); the
`ResourceStore` keeps what a restart needs. A grant is taken in memory at
once (nobody else can take those units), committed, and only then is its
process woken: a holder never runs on a grant a crash could take back. A
release is one write that deletes the ended process's rows and marks the
next holders granted (the handover), after the process's final checkpoint.
At start, rows of processes that ended (a crash between their final
checkpoint and the release) are released, and waiters re-queue in their
stored order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry import StoreUnavailable

from .abc import Hold, ResourceStore
from .definition import Resource
from .records import Process
from .states import BranchState, WaitKind

__all__ = ["Request", "ResourcePool"]

log = logging.getLogger("workflows.engine")

STORAGE_RETRY_MIN, STORAGE_RETRY_MAX = 0.1, 5.0


@dataclass(slots=True, eq=False)
class Request:
    """One process's request at one step; `granted` once its grant is committed,
    `refused` (why) when it can never be granted (the resource went, or shrank)."""

    process: str
    step: str
    resource: str
    key: str | None
    units: int
    seq: int
    granted: bool = False
    refused: str | None = None
    taken: bool = False  # granted in memory: counted in use, maybe not yet committed
    freed_at: float | None = None  # a waiter's grant: when the release that freed it began
    shared: bool = False  # another step of its process asked for the same: it waits on it

    @classmethod
    def restored(cls, hold: Hold) -> Request:
        """A stored row back in memory (at start): held, or waiting in its place."""
        return cls(
            process=hold.process,
            step=hold.step,
            resource=hold.resource,
            key=hold.key,
            units=hold.units,
            seq=hold.seq,
            granted=hold.held,
            taken=hold.held,
        )

    def hold(self) -> Hold:
        return Hold(
            process=self.process,
            step=self.step,
            resource=self.resource,
            key=self.key,
            units=self.units,
            seq=self.seq,
            held=self.taken,
        )


@dataclass(slots=True)
class _Slot:
    """One (resource, key): units in use and the requests waiting, oldest first."""

    in_use: int = 0
    queue: deque[Request] = field(default_factory=deque)


class ResourcePool:
    """Every resource's holds and queues; the runner asks it before a step with `acquire`
    (`request`), a cancelled waiter leaves (`leave`), an ended process releases (`release`)."""

    def __init__(
        self,
        store: ResourceStore,
        resources: Iterable[Resource] = (),
        *,
        wake: Callable[[str], None] = lambda process_id: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self._wake, self._clock = store, wake, clock
        # In force (config.yaml's `resources`); `_capacities` also keeps each one removed
        # since, for the processes that hold or wait for it.
        self.capacities: dict[str, int] = {r.name: r.capacity for r in resources}
        self._capacities = dict(self.capacities)
        self._slots: dict[tuple[str, str | None], _Slot] = {}
        self._requests: dict[str, dict[str, Request]] = {}  # process -> step -> request
        self.in_use: dict[str, int] = {}  # resource -> units held (the metric)
        self.waiting: dict[str, int] = {}  # resource -> requests waiting (the metric)
        self._seq = 0

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, unfinished: Callable[[list[str]], Awaitable[list[Process]]]) -> None:
        """Rebuild from the stored rows: holds of unfinished processes (`unfinished` reads
        those of the ids given, in memory or not) stay held, their
        waiters re-queue in stored order (a request that will never run is dropped: its
        process was cancelled, or it is a branch a sibling's failure halted); rows of
        ended processes are released. Then whatever now fits is granted. One write."""
        await self.store.create_tables()
        # A term before (an engine closed and opened again) leaves nothing: the metric
        # dicts are cleared in place, as collectors hold them.
        self._slots, self._requests = {}, {}
        self.in_use.clear()
        self.waiting.clear()
        holds = await self.store.holds()
        processes = {p.id: p for p in await unfinished(sorted({h.process for h in holds}))}
        released: set[str] = set()
        left: list[tuple[str, str]] = []
        for hold in holds:
            self._seq = max(self._seq, hold.seq)
            process = processes.get(hold.process)
            if process is None:
                released.add(hold.process)
                continue
            if not hold.held and _stopped(process, hold.step):
                left.append((hold.process, hold.step))
                continue
            request = Request.restored(hold)
            self._requests.setdefault(hold.process, {})[hold.step] = request
            slot = self._slot(hold.resource, hold.key)
            if hold.held:
                slot.in_use += hold.units
                self._count(self.in_use, hold.resource, hold.units)
            else:
                slot.queue.append(request)
                self._count(self.waiting, hold.resource, 1)
        granted = self._grant_all()
        if released or left or granted:
            await self._settle(released=sorted(released), left=left, granted=granted)
        self._granted(granted)

    async def configure(self, resources: Iterable[Resource]) -> None:
        """New capacities (a reload): they apply to grants from now on. Holders keep what
        they hold when a capacity shrinks; a grown one is granted to waiters at once. A
        resource no longer configured keeps its last capacity for processes that hold or
        wait for it, and refuses new requests."""
        self.set_capacities(resources)
        granted = self._grant_all()
        if granted:
            await self._settle(granted=granted)
        self._granted(granted)

    def set_capacities(self, resources: Iterable[Resource]) -> None:
        """New capacities, granted nothing yet (a closed engine's reload: `open` grants)."""
        self.capacities = {r.name: r.capacity for r in resources}
        self._capacities.update(self.capacities)

    # -- the runner's calls ----------------------------------------------------------

    async def request(
        self, process: str, step: str, resource: str, key: str | None, units: int
    ) -> Request:
        """The process's request at this step: the one it has (a retry, a resume after a
        restart), else a new one, granted at once (committed when this returns) when it
        fits and nobody waits before it, else queued (stored when this returns). A process
        never queues behind itself: at a second step (or branch) asking for the same
        (resource, key) it shares the request it has when that covers the units, else the
        request is refused (a definition stored before config checks forbade this)."""
        known = self._requests.get(process, {}).get(step)
        if known is not None:
            return known
        self._seq += 1
        request = Request(
            process=process, step=step, resource=resource, key=key, units=units, seq=self._seq
        )
        own = self._own(process, resource, key)
        if own is not None:  # never queued behind its own process: it would wait forever
            if own.units >= units:
                self._requests[process][step] = own  # the same hold: no row, no write
                own.shared = True
                return own
            request.refused = _asked_again(request, own)
            return request
        capacity = self.capacities.get(resource)
        if capacity is None:
            request.refused = f"resource {resource!r} is not defined"
            return request
        if units > capacity:
            request.refused = f"{units} units of {resource!r} exceed its capacity {capacity}"
            return request
        self._requests.setdefault(process, {})[step] = request
        slot = self._slot(resource, key)
        if not slot.queue and slot.in_use + units <= capacity:
            self._take(slot, request)
            await self._settle(granted=[request])
            request.granted = True
            if request.shared:  # a sibling branch shared it while it was being committed
                self._wake(process)
            return request
        slot.queue.append(request)
        self._count(self.waiting, resource, 1)
        await self._durably(lambda: self.store.wait(request.hold()))
        return request

    async def leave(self, request: Request) -> None:
        """A waiter whose process was cancelled leaves the queue (and the table); those
        behind it may now fit. A request granted meanwhile stays held until its process
        ends, like every hold."""
        slot = self._slots.get((request.resource, request.key))
        if request.taken or slot is None or request not in slot.queue:
            return
        slot.queue.remove(request)
        self._count(self.waiting, request.resource, -1)
        steps = self._requests.get(request.process, {})
        for step in [step for step, known in steps.items() if known is request]:
            del steps[step]  # the step that asked, and each that shared its request
        granted = self._grant(request.resource, request.key, self._clock())
        await self._settle(left=[(request.process, request.step)], granted=granted)
        self._granted(granted)

    async def release(self, process: str) -> None:
        """Everything the ended process holds or waits for, after its final checkpoint:
        one write deletes its rows and commits the grants its units allow, then the new
        holders are woken. Free for a process that never asked for a resource."""
        requests = self._requests.pop(process, None)
        if not requests:
            return
        now = self._clock()
        touched: set[tuple[str, str | None]] = set()
        for request in dict.fromkeys(requests.values()):  # a shared request counts once
            slot = self._slot(request.resource, request.key)
            if request.taken:
                slot.in_use -= request.units
                self._count(self.in_use, request.resource, -request.units)
            elif request in slot.queue:
                slot.queue.remove(request)
                self._count(self.waiting, request.resource, -1)
            touched.add((request.resource, request.key))
        granted = [g for resource, key in touched for g in self._grant(resource, key, now)]
        await self._settle(released=[process], granted=granted)
        self._granted(granted)

    def asked(self, process: str) -> bool:
        """Whether the process holds or waits for anything (else its end costs nothing)."""
        return process in self._requests

    def waiting_for(self, process: str, step: str) -> dict[str, Any] | None:
        """`waiting_for` of a process's step (or branch) queued for a resource (DESIGN.md
        §3): detail `funds key P-7: 2 ahead`; None when it waits for none."""
        request = self._requests.get(process, {}).get(step)
        if request is None or request.taken or request.refused is not None:
            return None
        slot = self._slots.get((request.resource, request.key))
        if slot is None or request not in slot.queue:
            return None
        ahead = slot.queue.index(request)
        where = request.resource + (f" key {request.key}" if request.key is not None else "")
        return {"kind": WaitKind.RESOURCE, "until": None, "detail": f"{where}: {ahead} ahead"}

    # -- inside ----------------------------------------------------------------------

    def _slot(self, resource: str, key: str | None) -> _Slot:
        slot = self._slots.get((resource, key))
        if slot is None:
            slot = self._slots[(resource, key)] = _Slot()
        return slot

    def _own(self, process: str, resource: str, key: str | None) -> Request | None:
        """The request the process has made for this (resource, key) at another step."""
        for request in self._requests.get(process, {}).values():
            if request.resource == resource and request.key == key:
                return request
        return None

    def _take(self, slot: _Slot, request: Request) -> None:
        slot.in_use += request.units
        request.taken = True
        self._count(self.in_use, request.resource, request.units)

    def _grant(
        self, resource: str, key: str | None, freed_at: float | None = None
    ) -> list[Request]:
        """Take units for the waiters at the head of the queue while they fit; a head that
        can never fit (its resource shrank below it) is refused, not left to block."""
        slot = self._slots.get((resource, key))
        if slot is None:
            return []
        capacity = self._capacities.get(resource, 0)
        granted = []
        while slot.queue:
            head = slot.queue[0]
            if head.units > capacity:
                slot.queue.popleft()
                self._count(self.waiting, resource, -1)
                head.refused = f"{head.units} units of {resource!r} exceed its capacity {capacity}"
                self._wake(head.process)  # its row goes when its process ends
                continue
            if slot.in_use + head.units > capacity:
                break
            slot.queue.popleft()
            self._count(self.waiting, resource, -1)
            self._take(slot, head)
            head.freed_at = freed_at
            granted.append(head)
        if not slot.queue and not slot.in_use:
            del self._slots[(resource, key)]  # keys are unbounded: keep only live ones
        return granted

    def _grant_all(self) -> list[Request]:
        return [g for resource, key in list(self._slots) for g in self._grant(resource, key)]

    def _granted(self, granted: Sequence[Request]) -> None:
        """After the grants' commit: their processes may run now."""
        for request in granted:
            request.granted = True
            self._wake(request.process)

    async def _settle(
        self,
        *,
        released: Sequence[str] = (),
        left: Sequence[tuple[str, str]] = (),
        granted: Sequence[Request] = (),
    ) -> None:
        holds = [request.hold() for request in granted]
        await self._durably(lambda: self.store.settle(released=released, left=left, granted=holds))

    async def _durably(self, write: Callable[[], Awaitable[None]]) -> None:
        """Write, waiting out a storage failure (disk full, read-only) as checkpoints do:
        the units stay taken in memory meanwhile, so nobody else gets them."""
        pause = STORAGE_RETRY_MIN
        while True:
            try:
                await write()
                return
            except StoreUnavailable:
                log.debug("resource write waits for storage (%.1fs)", pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)

    @staticmethod
    def _count(counts: dict[str, int], resource: str, delta: int) -> None:
        counts[resource] = counts.get(resource, 0) + delta


def _stopped(process: Process, step: str) -> bool:
    """Whether the process's step will not run again: the process was cancelled, or the
    step is a branch that a sibling's failure halted (a restart never resumes it)."""
    if process.cancel_requested:
        return True
    failed = any(b.state == BranchState.FAILED for b in process.branches.values())
    return failed and step in process.branches


def _asked_again(request: Request, own: Request) -> str:
    """Why a process's second request for a (resource, key) it already asked for with
    fewer units is refused: waiting for room its own hold takes would never end."""
    where = repr(request.resource) + (f" key {request.key}" if request.key is not None else "")
    return (
        f"step {request.step!r} asks for {request.units} units of {where}, which this process "
        f"already asked for at step {own.step!r} ({own.units}): acquire it once, at the first "
        "step that needs it, with all the units"
    )
