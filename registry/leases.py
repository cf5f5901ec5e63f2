"""Leases: when each instance lapses and is removed, and the reaper that makes removals
durable.

Leases are exact: an instance whose last renewal was at `t` turns critical at `t + ttl`,
not at `2 * ttl` (the Eureka bug), and is removed `deregister_after` later. Deadlines sit
in a heap, checked lazily: a renewal pushes a new one and the stale one is skipped when
popped. `expire_due` runs on every read and write of the catalog, so an answer never
depends on when the reaper last ran; the reaper only makes the removals durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .changes import Change, ChangeKind, Changes
from .model import Instance

log = logging.getLogger("registry.catalog")  # the logger these lines were always under

MAX_REAPER_SLEEP = 1.0


@dataclass(kw_only=True, slots=True)
class Entry:
    """An instance in the catalog, with its lease."""

    instance: Instance
    renewed_at: float  # monotonic
    lapsed: bool = False
    removed: bool = False

    def expires_at(self) -> float | None:
        ttl = self.instance.ttl
        return None if ttl is None else self.renewed_at + ttl

    def removal_due(self) -> float | None:
        expires = self.expires_at()
        return None if expires is None else expires + self.instance.deregister_after


Entries = dict[str, dict[str, Entry]]  # service -> instance id -> entry


class Leases:
    """The deadline heap over the catalog's entries, and the reaper.

    `entries` is the catalog's own mapping (read, never written here); `remove` makes one
    removal durable and drops the entry, or requeues it when the store refuses.
    `slack()` (replicas: how late a heartbeat to another replica may reach this one; 0
    while this replica is the only one) is added to every deadline; while `reaping()` is
    false, lapses still apply but removals wait for the replica that reaps (another one's
    removal arrives as a change)."""

    @property
    def slack(self) -> float:
        return self._slack()

    def __init__(
        self,
        *,
        entries: Entries,
        changes: Changes,
        monotonic: Callable[[], float],
        remove: Callable[[Entry], Awaitable[None]],
        slack: Callable[[], float] = lambda: 0.0,
        reaping: Callable[[], bool] = lambda: True,
    ) -> None:
        self._entries, self._changes = entries, changes
        self._slack, self._reaping = slack, reaping
        self._monotonic, self._remove = monotonic, remove
        self._deadlines: list[tuple[float, str, str]] = []  # lazy: re-checked when popped
        self._removals: list[Entry] = []
        self._wakeup = asyncio.Event()
        self._paused = False
        self.expirations_total = 0

    def push(self, entry: Entry) -> None:
        """Queue the entry's next deadline (none without a ttl)."""
        expires = entry.expires_at()
        if expires is not None:
            deadline = (expires + self.slack, *entry.instance.key)
            heapq.heappush(self._deadlines, deadline)
            # The reaper sleeps until the earliest deadline: only a new earliest one moves
            # its wake-up (waking it for every registration cost a task step each).
            if self._deadlines[0] is deadline:
                self._wakeup.set()

    def expire_due(self) -> None:
        """Apply every lapse and removal whose time has come."""
        if self._paused:
            return
        now = self._monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, service, instance_id = heapq.heappop(self._deadlines)
            entry = self._entries.get(service, {}).get(instance_id)
            if entry is None or entry.removed:
                continue
            expires, removal = entry.expires_at(), entry.removal_due()
            if expires is None or removal is None:
                continue
            expires, removal = expires + self.slack, removal + self.slack
            if not entry.lapsed and now < expires:
                self.push(entry)  # renewed since this deadline was queued
            elif not entry.lapsed:
                entry.lapsed = True
                self.expirations_total += 1
                heapq.heappush(self._deadlines, (removal, service, instance_id))
                log.info("lease of %s/%s lapsed; instance is critical", service, instance_id)
                self._changes.announce(
                    service, Change(kind=ChangeKind.LAPSED, instance=entry.instance)
                )
            elif now >= removal and not self._reaping():
                heapq.heappush(self._deadlines, (now + MAX_REAPER_SLEEP, service, instance_id))
            elif now >= removal:
                entry.removed = True
                self._removals.append(entry)
                self._wakeup.set()
                self._changes.announce(
                    service, Change(kind=ChangeKind.DEREGISTERED, instance=entry.instance)
                )
            else:
                heapq.heappush(self._deadlines, (removal, service, instance_id))

    def requeue(self, entry: Entry) -> None:
        """A removal the store refused: the reaper tries it again."""
        self._removals.append(entry)

    async def run_reaper(self) -> None:
        """Make lease removals durable. Owned by the app; cancelled on shutdown."""
        while True:
            self.expire_due()
            while self._removals:
                await self._remove(self._removals.pop(0))
                self.expire_due()
            timeout = MAX_REAPER_SLEEP
            if self._deadlines:
                timeout = min(timeout, max(0.0, self._deadlines[0][0] - self._monotonic()))
            self._wakeup.clear()
            # Not asyncio.wait_for: on 3.11 it swallows a cancel that arrives as the event
            # is set (a registration just before shutdown), and the reaper never stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def pause_expiry(self) -> None:
        """The daemon itself is overloaded and refusing requests, heartbeats among them:
        no lease lapses for it. (A flood must not turn into every instance going critical.)"""
        if not self._paused:
            self._paused = True
            log.warning("overloaded: lease expiry paused until the load is served again")

    def resume_expiry(self) -> None:
        """Every lease still held is renewed from now, so clients whose heartbeats were
        refused get a whole ttl to come back."""
        if not self._paused:
            return
        self._paused = False
        now = self._monotonic()
        renewed = 0
        for entries in self._entries.values():
            for entry in entries.values():
                if entry.instance.ttl is not None and not entry.lapsed and not entry.removed:
                    entry.renewed_at = now
                    renewed += 1
        log.warning("load served again: lease expiry resumed, %d lease(s) renewed", renewed)
        self._wakeup.set()
