"""What a process waits on: its wakeup, the events it waits for, its deadline.

The three are separate because each has its own owner of time: a wakeup is
set by a cancel or an arrived event, events come from `Engine.publish` in the
bus's order, a deadline is a loop timer that outlives every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from scheduler import EventBus

from .records import Process, Signal, StoredEvent, Strand


class Wakeups:
    """One event per strand of a live process (its main line, each branch of a parallel
    step): set to end its sleep early (a cancel, an event, a task's end). A wake is for
    the whole process; each strand looks again at what it waits for and sleeps on."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._events: dict[str, dict[str, asyncio.Event]] = {}  # process id -> strand -> event

    def add(self, process_id: str) -> None:
        self._events[process_id] = {"": asyncio.Event()}

    def remove(self, process_id: str) -> None:
        self._events.pop(process_id, None)

    async def sleep(self, strand: Strand, until: float | None, *, cancellable: bool = True) -> bool:
        """Sleep until `until` (None: until woken). False when woken early (cancel, event)."""
        events = self._events[strand.process.id]
        wakeup = events.get(strand.name)
        if wakeup is None:
            wakeup = events[strand.name] = asyncio.Event()
        wakeup.clear()
        if cancellable and strand.stopped():
            return False
        timeout = None if until is None else max(0.0, until - self._clock())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await wakeup.wait()
                    wakeup.clear()
                    if cancellable:
                        return False
        except TimeoutError:
            return True

    def wake(self, key: str) -> None:
        """Wake every strand of the process (`key`: its id, or a strand's `<id>/<branch>`)."""
        for wakeup in self._events.get(key.partition("/")[0], {}).values():
            wakeup.set()


class EventWaits:
    """Processes waiting for events, and the events handed to them.

    The runner registers in `waiting` and takes from `arrived` directly (a
    step's hot path); `deliver` is the one writer of `arrived` for live events.
    Both are keyed by strand (`Strand.key`): two branches of a process may wait at once.
    A waiter takes events with ids after its `since` (its wait_seq) only: one whose
    publish began before the wait (reserved, not yet stored) is not its to take.
    """

    def __init__(self, bus: EventBus, wake: Callable[[str], None]) -> None:
        self._bus, self._wake = bus, wake
        # topic -> strand -> (match, since)
        self.waiting: dict[str, dict[str, tuple[dict[str, Any], int]]] = {}
        self.arrived: dict[str, StoredEvent] = {}
        self._stored: dict[int, StoredEvent] = {}  # stored, not yet delivered (see deliver)

    def deliver(self, event: StoredEvent | None = None) -> None:
        """Hand stored events to waiting processes in id order, up to the bus's position,
        as the bus does: an event whose earlier reservation is still being written waits.
        So a process that starts waiting at `bus.reserved_through` gets live exactly the
        events after it, as `events_since(wait_seq)` finds them after a restart."""
        if event is not None:
            self._stored[event.seq] = event
        while self._stored and (first := min(self._stored)) <= self._bus.position:
            event = self._stored.pop(first)
            for key, (match, since) in list(self.waiting.get(event.topic, {}).items()):
                if event.seq > since and matches(match, event.data) and key not in self.arrived:
                    self.arrived[key] = event
                    self._wake(key)


class SignalWaits:
    """Signals kept for live processes until a step takes them, and which process waits
    for which signal now (only those are woken)."""

    def __init__(self, wake: Callable[[str], None]) -> None:
        self._wake = wake
        self.waiting: dict[str, dict[str, str]] = {}  # process id -> strand -> signal name
        self._kept: dict[str, list[Signal]] = {}  # process id -> signals, oldest first

    def keep(self, signal: Signal) -> None:
        self._kept.setdefault(signal.process, []).append(signal)
        if signal.name in self.waiting.get(signal.process, {}).values():
            self._wake(signal.process)

    def take(self, process_id: str, name: str) -> Signal | None:
        """The oldest kept signal of that name, now the step's (once)."""
        kept = self._kept.get(process_id, [])
        for i, signal in enumerate(kept):
            if signal.name == name:
                return kept.pop(i)
        return None

    def forget(self, process_id: str) -> None:
        self._kept.pop(process_id, None)
        self.waiting.pop(process_id, None)


class Deadlines:
    """A loop timer per process with a deadline; `passed` runs once when it fires."""

    def __init__(
        self, clock: Callable[[], float], passed: Callable[[Process], Awaitable[None]]
    ) -> None:
        self._clock, self._passed = clock, passed
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._marking: set[asyncio.Task[None]] = set()  # deadline marks being written

    def arm(self, process: Process) -> None:
        if process.deadline_at is None or process.deadline_missed:
            return
        delay = max(0.0, process.deadline_at - self._clock())

        def fire() -> None:  # the loop keeps only weak references to tasks: hold it
            task = asyncio.create_task(self._mark(process))
            self._marking.add(task)
            task.add_done_callback(self._marking.discard)

        self._handles[process.id] = asyncio.get_running_loop().call_later(delay, fire)

    async def _mark(self, process: Process) -> None:
        self._handles.pop(process.id, None)
        await self._passed(process)

    def cancel(self, process_id: str) -> None:
        handle = self._handles.pop(process_id, None)
        if handle is not None:
            handle.cancel()

    async def close(self) -> None:
        """At close: the timers go and the marks being written finish, so none is written
        after the engine closed (another replica may run the process by then)."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        await asyncio.gather(*self._marking, return_exceptions=True)


def matches(match: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    return all(data.get(key) == value for key, value in match.items())
