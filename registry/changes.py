"""What the registry tells others about a change: its modify index, the blocking queries
waiting on it, and the listeners (the health checker, SSE, the metrics) it calls."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .model import Instance

log = logging.getLogger("registry.catalog")  # the logger these lines were always under


class ChangeKind(enum.StrEnum):
    REGISTERED = "registered"
    UPDATED = "updated"
    DEREGISTERED = "deregistered"
    LAPSED = "lapsed"
    RENEWED = "renewed"  # back from a lapse


@dataclass(frozen=True, kw_only=True, slots=True)
class Change:
    kind: ChangeKind
    instance: Instance


class Changes:
    """The modify index, per service and overall, and who hears of a change.

    Every change raises the index by one, wakes the blocking queries on its service and
    calls each listener; one failing listener never stops the others."""

    __slots__ = ("_listeners", "_waiters", "index", "service_index")

    def __init__(self) -> None:
        self.index = 0
        self.service_index: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._listeners: list[Callable[[Change], None]] = []

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    def announce(self, service: str, change: Change | None, *, at: int = 0) -> None:
        """A change to `service`; None: one the registry does not own (a health transition),
        which only bumps the index and wakes the waiters. `at`: the index another replica
        made the change at; this one's index rises to it if behind (never goes down)."""
        self.index = max(self.index + 1, at)
        self.service_index[service] = self.index
        waiters = self._waiters.pop(service, None)
        if waiters is not None:
            waiters.set()
        if change is None:
            return
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("registry listener %r failed on %s", listener, change.kind)

    async def wait(self, service: str, passed: Callable[[], bool], wait: float) -> None:
        """Until `passed()` or `wait` seconds; woken by each change to `service`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not passed():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            event = self._waiters.setdefault(service, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # not wait_for: see Leases.run_reaper
                    await event.wait()
