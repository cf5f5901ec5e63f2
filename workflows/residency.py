"""Which processes the engine keeps in memory: those running, and those due soon.

A process waiting on a timer an hour away, or on an event that may never
come, is a row and nothing more: no task, no wakeup, no dict entry. Its row
says when it must be back (`Process.due_at`, kept in an index), and what
may bring it back sooner: a cancel, a signal, or a published event its
stored match accepts (`Engine.publish` asks the store). This loop reads, as
time moves, the rows that fall due within `horizon`, earliest first, so
each timer is in memory well before it fires and fires from the loop's own
timer, not from a poll: on time to the millisecond.

The runner parks a process (takes it out of memory) only at a wait whose
due time, as its last checkpoint wrote it, lies beyond the horizon; so a
row this loop has passed (due before its cursor) is never left out of
memory. `cap` bounds how many are in memory when more fall due at once
(after a long downtime): the earliest go first, the rest as room frees.

A read races processes leaving memory: it may return the row of one that
finished or parked while the read ran, as it was before. `left` records
when each left, and a row read before that is not brought back (a stale
copy would run a step twice); one that parked is read again when due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable

from registry import StoreUnavailable

from .abc import WorkflowStore
from .records import Process

log = logging.getLogger("workflows.engine")

HORIZON = 60.0  # seconds ahead a process is read back into memory
TICKS = 12  # the horizon moves this often within itself: no timer is read late
PAGE = 1000  # rows a read takes at most
CAP = 20_000  # processes in memory at most, before new starts (those always run)
FORGET_LEFT = 60.0  # seconds a departure is remembered: far longer than any read


class Residency:
    def __init__(
        self,
        store: WorkflowStore,
        *,
        clock: Callable[[], float],
        live: Collection[str],
        creating: Collection[str],
        spawn: Callable[[Process], None],
        owner: Callable[[], str | None] = lambda: None,
        horizon: float = HORIZON,
        cap: int = CAP,
    ) -> None:
        self._store, self._clock, self._live, self._spawn = store, clock, live, spawn
        self._creating = creating  # stored, not yet in memory: their creator spawns them
        self._owner = owner  # replicas: rows read become this member key's (None: one daemon)
        self.horizon, self._tick, self._cap = horizon, horizon / TICKS, cap
        self._cursor: tuple[float, int] | None = None  # the last row read by due time
        self._left: dict[str, float] = {}  # process id -> when it left memory (monotonic)
        self._departures: deque[tuple[float, str]] = deque()  # (when, id), oldest first
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # a load under way brings nothing into the next term

    async def open(self) -> int:
        """Read what is due now and within the horizon (one page: the daemon answers
        at once; the loop reads the rest). How many came into memory."""
        self._cursor = None
        return await self._read_due()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="workflows-residency")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def rewind(self, at: float) -> None:
        """Rows are about to be made due at `at`, before the cursor: read from there."""
        if self._cursor is not None and self._cursor[0] >= at:
            self._cursor = (at, -1)

    def left_after(self, process_id: str, began: float) -> bool:
        """Whether the process left memory after `began` (time.monotonic)."""
        return self._left.get(process_id, -1.0) >= began

    def left(self, process_id: str) -> None:
        """The process left memory (it finished or parked). Departures older than
        FORGET_LEFT are dropped oldest first as new ones come: no pass over them all,
        however many finish a second."""
        now = time.monotonic()
        self._left[process_id] = now
        departures = self._departures
        departures.append((now, process_id))
        while now - departures[0][0] >= FORGET_LEFT:
            at, gone = departures.popleft()
            if self._left.get(gone) == at:  # not left again since
                del self._left[gone]

    async def load(self, ids: Iterable[str]) -> None:
        """Bring these processes into memory, those unfinished and not there (a cancel, a
        signal or an event for them). Read again when one left while it was read."""
        wanted = [i for i in ids if i not in self._live and i not in self._creating]
        for _ in range(3):
            if not wanted:
                return
            began = time.monotonic()
            rows = await self._store.unfinished_of(wanted, self._owner())
            wanted = [
                p.id
                for p in rows
                if not self._bring(p, began)
                and p.id not in self._live
                and p.id not in self._creating
            ]

    async def _run(self) -> None:
        while True:
            try:
                more = True
                while more:  # a full page: more may be due, read on at once
                    more = await self._read_due() >= PAGE
            except StoreUnavailable as exc:  # read again at the next tick
                log.warning("processes due could not be read: %s", exc)
            except Exception:  # a bug here must not stop timers for good
                log.exception("reading processes due failed")
            await asyncio.sleep(self._tick)

    async def _read_due(self) -> int:
        """One page of rows due by now + horizon after the cursor: those not in memory
        come in. How many rows were read (PAGE: there may be more)."""
        room = self._cap - len(self._live)
        if room <= 0:
            return 0
        began = time.monotonic()
        before, limit = self._clock() + self.horizon, min(PAGE, room)
        rows = await self._store.due(self._cursor, before, limit, self._owner())
        for process in rows:
            self._bring(process, began)
            assert process.due_at is not None  # due() reads only rows with one
            self._cursor = (process.due_at, process.seq)
        return len(rows)

    def _bring(self, process: Process, began: float) -> bool:
        """Spawn a row read at `began` unless it is in memory or left after the read
        began (then the row may be stale). True when spawned."""
        if self._closed or process.id in self._live or process.id in self._creating:
            return False
        if self._left.get(process.id, -1.0) >= began:
            return False
        self._spawn(process)
        return True
