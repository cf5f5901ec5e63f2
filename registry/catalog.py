"""The registry's live state: instances, leases, the modify index and blocking waits.

Writes go to the store first and are applied in memory only once durable, so
whatever a reader saw survives a crash. Heartbeats touch memory only: a lease
is a promise about the next few seconds, not something worth an fsync.

Leases are exact: an instance whose last renewal was at `t` turns critical at
`t + ttl`, not at `2 * ttl` (the Eureka bug), and is removed
`deregister_after` later. Expiry is computed from the clock whenever the
catalog is read, so the answer never depends on when the reaper last ran; the
reaper only makes the removals durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from registry.abc import RegistryStore

from .errors import Conflict, StoreUnavailable, UnknownInstance
from .model import HealthState, Instance

log = logging.getLogger(__name__)

MAX_REAPER_SLEEP = 1.0


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ChangeKind(enum.StrEnum):
    REGISTERED = "registered"
    UPDATED = "updated"
    DEREGISTERED = "deregistered"
    LAPSED = "lapsed"
    RENEWED = "renewed"  # back from a lapse


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    instance: Instance


class HealthSource(Protocol):
    """Where health comes from (the monitor's probes); the registry only adds lease lapses."""

    def health_of(self, instance: Instance) -> HealthState: ...


class UnknownHealth:
    def health_of(self, instance: Instance) -> HealthState:
        return HealthState.UNKNOWN


@dataclass(slots=True)
class _Entry:
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


class _KeyLock:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (a refcount:
    right after a release the woken waiter has not re-acquired yet, so `locked()` lies)."""

    __slots__ = ("entry", "key", "locks")

    def __init__(self, locks: dict[tuple[str, str], list[Any]], key: tuple[str, str]) -> None:
        self.locks, self.key = locks, key
        self.entry = locks.setdefault(key, [asyncio.Lock(), 0])
        self.entry[1] += 1

    async def __aenter__(self) -> None:
        try:
            await self.entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.entry[0].release()
        self._leave()

    def _leave(self) -> None:
        self.entry[1] -= 1
        if self.entry[1] == 0:
            del self.locks[self.key]


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """An instance as readers see it."""

    instance: Instance
    health: HealthState
    lease_expires_in: float | None  # seconds; negative once lapsed
    lapsed: bool


class Catalog:
    def __init__(
        self,
        store: RegistryStore,
        *,
        clock: Clock | None = None,
        health: HealthSource | None = None,
    ) -> None:
        self._store = store
        self._clock = clock or SystemClock()
        self.health: HealthSource = health or UnknownHealth()
        self._services: dict[str, dict[str, _Entry]] = {}
        self._service_index: dict[str, int] = {}
        self._index = 0
        self._deadlines: list[tuple[float, str, str]] = []  # lazy: re-checked when popped
        self._removals: list[_Entry] = []
        self._waiters: dict[str, asyncio.Event] = {}
        self._key_locks: dict[tuple[str, str], list[Any]] = {}
        self._reaper_wakeup = asyncio.Event()
        self._listeners: list[Callable[[Change], None]] = []
        self._declared: frozenset[str] = frozenset()
        self.heartbeats_total = 0
        self.expirations_total = 0
        self._expiry_paused = False

    # -- lifecycle -----------------------------------------------------------------

    async def load(self, static: Iterable[Instance] = (), declared: Iterable[str] = ()) -> int:
        """Restore registered instances; each lease gets one fresh ttl of grace.

        `static` are config's instances; `declared` are config's services, listed
        even while no instance of theirs exists.
        """
        instances, index = await self._store.load()
        now = self._clock.monotonic()
        self._declared = frozenset(declared)
        for instance in static:
            self._put(_Entry(replace(instance, static=True), now))
        for instance in instances:
            if self._entry(instance.service, instance.id) is not None:
                log.warning("registered %s/%s shadowed by a static instance", *instance.key)
                continue
            self._put(_Entry(instance, now))
        # Above anything a client saw before the restart (see ARCHITECTURE.md, "index").
        self._index = index + 1
        for service in self._services:
            self._service_index[service] = self._index
        return len(instances)

    def replace_static(self, static: Iterable[Instance], declared: Iterable[str]) -> None:
        """Config's instances and services after a reload: added, changed and removed ones
        take effect at once (they live in the config, not in the store)."""
        now = self._clock.monotonic()
        self._declared = frozenset(declared)
        wanted = {i.key: replace(i, static=True) for i in static}
        for entries in list(self._services.values()):
            for entry in list(entries.values()):
                if entry.instance.static and entry.instance.key not in wanted:
                    self._drop(entry)
                    self._announce(
                        entry.instance.service, Change(ChangeKind.DEREGISTERED, entry.instance)
                    )
        for key, instance in wanted.items():
            current = self._entry(*key)
            if current is not None and current.instance == instance:
                continue
            kind = ChangeKind.REGISTERED if current is None else ChangeKind.UPDATED
            self._put(_Entry(instance, now))
            self._announce(instance.service, Change(kind, instance))
        for service in self._declared:
            self._service_index.setdefault(service, self._index)

    async def run_reaper(self) -> None:
        """Make lease removals durable. Owned by the app; cancelled on shutdown."""
        while True:
            self.expire_due()
            while self._removals:
                await self._remove_durably(self._removals.pop(0))
                self.expire_due()
            timeout = MAX_REAPER_SLEEP
            if self._deadlines:
                timeout = min(timeout, max(0.0, self._deadlines[0][0] - self._clock.monotonic()))
            self._reaper_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reaper_wakeup.wait(), timeout)

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    # -- writes --------------------------------------------------------------------

    async def register(self, instance: Instance) -> tuple[InstanceStatus, bool]:
        """Register or update (service, id). Returns the instance as stored, and whether new."""
        async with self._locked(instance.key):
            self.expire_due()
            current = self._entry(instance.service, instance.id)
            if current is not None and current.instance.static:
                raise Conflict(f"{instance.service}/{instance.id} is defined in config.yaml")
            created = current is None or current.removed
            if current is not None and not created:
                if current.instance.same_registration(instance) and not current.lapsed:
                    current.renewed_at = self._clock.monotonic()
                    return self._status(current, current.renewed_at), False
                instance = replace(instance, registered_at=current.instance.registered_at)
            elif not instance.registered_at:
                instance = replace(instance, registered_at=instance.updated_at or self.now())
            await self._durably(self._store.save(instance, self._index + 1))
            entry = _Entry(instance, self._clock.monotonic())
            self._put(entry)
            kind = ChangeKind.REGISTERED if created else ChangeKind.UPDATED
            self._announce(instance.service, Change(kind, instance))
            return self._status(entry, entry.renewed_at), created

    def heartbeat(self, service: str, instance_id: str) -> InstanceStatus:
        """Renew a lease. In memory only; a lapsed instance comes back at once."""
        entry = self._registered(service, instance_id)
        if entry.instance.ttl is None:
            raise Conflict(f"{service}/{instance_id} was registered without a ttl")
        self.heartbeats_total += 1
        entry.renewed_at = self._clock.monotonic()
        if entry.lapsed:
            entry.lapsed = False
            self._push_deadline(entry)
            self._announce(service, Change(ChangeKind.RENEWED, entry.instance))
        return self._status(entry, entry.renewed_at)

    async def deregister(self, service: str, instance_id: str) -> None:
        async with self._locked((service, instance_id)):
            entry = self._registered(service, instance_id)
            await self._durably(self._store.delete(service, instance_id, self._index + 1))
            self._drop(entry)
            self._announce(service, Change(ChangeKind.DEREGISTERED, entry.instance))

    def _registered(self, service: str, instance_id: str) -> _Entry:
        """The live, API-managed entry: 404 when unknown, 409 when it comes from config."""
        self.expire_due()
        entry = self._entry(service, instance_id)
        if entry is None or entry.removed:
            raise UnknownInstance(f"instance {service}/{instance_id} is not registered")
        if entry.instance.static:
            raise Conflict(f"{service}/{instance_id} is defined in config.yaml; change it there")
        return entry

    def now(self) -> float:
        """Wall-clock time as the catalog sees it (what registered_at/updated_at record)."""
        return self._clock.time()

    def touch(self, service: str) -> None:
        """Bump the index for a change the registry does not own (a health transition)."""
        if service in self._services:
            self._announce(service, None)

    # -- reads ---------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The registry's modify index (as of the last read or write, which apply due lapses)."""
        return self._index

    def service_index(self, service: str) -> int:
        self.expire_due()
        return self._service_index.get(service, 0)

    def services(self) -> dict[str, list[InstanceStatus]]:
        self.expire_due()
        now = self._clock.monotonic()
        names = sorted(self._declared.union(self._services))
        return {
            name: [
                self._status(entry, now)
                for _, entry in sorted(self._services.get(name, {}).items())
                if not entry.removed
            ]
            for name in names
        }

    def service_names(self) -> list[str]:
        """The names `services()` lists, sorted, without building a status per instance."""
        self.expire_due()
        return sorted(self._declared.union(self._services))

    def instances(self, service: str | None = None) -> list[InstanceStatus]:
        """Instances in a stable order (service, id), optionally of one service."""
        self.expire_due()
        now = self._clock.monotonic()
        names = [service] if service is not None else sorted(self._services)
        out: list[InstanceStatus] = []
        for name in names:
            entries = self._services.get(name, {})
            live = (entries[i] for i in sorted(entries) if not entries[i].removed)
            out.extend(self._status(entry, now) for entry in live)
        return out

    async def wait_for_change(self, service: str, index: int, wait: float) -> int:
        """Wait until the service's modify index passes `index` or `wait` seconds elapse.

        An index from the future (the daemon restarted, or a made-up number)
        returns at once, so the client starts over as Consul's clients do.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._passed(service, index):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            event = self._waiters.setdefault(service, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
        return self.service_index(service)

    def _passed(self, service: str, index: int) -> bool:
        return self.service_index(service) > index or index > self._index

    # -- internals -----------------------------------------------------------------

    def pause_expiry(self) -> None:
        """The daemon itself is overloaded and refusing requests, heartbeats among them:
        no lease lapses for it. (A flood must not turn into every instance going critical.)"""
        if not self._expiry_paused:
            self._expiry_paused = True
            log.warning("overloaded: lease expiry paused until the load is served again")

    def resume_expiry(self) -> None:
        """Every lease still held is renewed from now, so clients whose heartbeats were
        refused get a whole ttl to come back."""
        if not self._expiry_paused:
            return
        self._expiry_paused = False
        now = self._clock.monotonic()
        renewed = 0
        for entries in self._services.values():
            for entry in entries.values():
                if entry.instance.ttl is not None and not entry.lapsed and not entry.removed:
                    entry.renewed_at = now
                    renewed += 1
        log.warning("load served again: lease expiry resumed, %d lease(s) renewed", renewed)
        self._reaper_wakeup.set()

    def expire_due(self) -> None:
        """Apply every lapse and removal whose time has come."""
        if self._expiry_paused:
            return
        now = self._clock.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, service, instance_id = heapq.heappop(self._deadlines)
            entry = self._entry(service, instance_id)
            if entry is None or entry.removed:
                continue
            expires, removal = entry.expires_at(), entry.removal_due()
            if expires is None or removal is None:
                continue
            if not entry.lapsed and now < expires:
                self._push_deadline(entry)  # renewed since this deadline was queued
            elif not entry.lapsed:
                entry.lapsed = True
                self.expirations_total += 1
                heapq.heappush(self._deadlines, (removal, service, instance_id))
                log.info("lease of %s/%s lapsed; instance is critical", service, instance_id)
                self._announce(service, Change(ChangeKind.LAPSED, entry.instance))
            elif now >= removal:
                entry.removed = True
                self._removals.append(entry)
                self._reaper_wakeup.set()
                self._announce(service, Change(ChangeKind.DEREGISTERED, entry.instance))
            else:
                heapq.heappush(self._deadlines, (removal, service, instance_id))

    async def _remove_durably(self, entry: _Entry) -> None:
        service, instance_id = entry.instance.key
        async with self._locked(entry.instance.key):
            if self._entry(service, instance_id) is not entry:
                return  # registered again meanwhile: the new registration stands
            try:
                await self._store.delete(service, instance_id, self._index)
            except Exception:
                log.exception("could not remove lapsed %s/%s; will retry", service, instance_id)
                self._removals.append(entry)
                await asyncio.sleep(MAX_REAPER_SLEEP)
                return
            self._drop(entry)
            log.info("removed %s/%s after its lease lapsed", service, instance_id)

    @staticmethod
    async def _durably(write: Awaitable[None]) -> None:
        try:
            await write
        except StoreUnavailable:
            raise  # the database has said so, once
        except Exception as exc:
            log.error("registry write failed: %s", exc)
            raise StoreUnavailable(f"storage unavailable, change not made: {exc}") from exc

    def _locked(self, key: tuple[str, str]) -> _KeyLock:
        """Serialize writes to one key, so disk and memory apply them in the same order."""
        return _KeyLock(self._key_locks, key)

    def _status(self, entry: _Entry, now: float) -> InstanceStatus:
        expires = entry.expires_at()
        health = HealthState.CRITICAL if entry.lapsed else self.health.health_of(entry.instance)
        return InstanceStatus(
            instance=entry.instance,
            health=health,
            lease_expires_in=None if expires is None else expires - now,
            lapsed=entry.lapsed,
        )

    def _entry(self, service: str, instance_id: str) -> _Entry | None:
        return self._services.get(service, {}).get(instance_id)

    def _put(self, entry: _Entry) -> None:
        self._services.setdefault(entry.instance.service, {})[entry.instance.id] = entry
        self._push_deadline(entry)

    def _drop(self, entry: _Entry) -> None:
        service, instance_id = entry.instance.key
        entries = self._services.get(service, {})
        entries.pop(instance_id, None)
        if not entries:
            self._services.pop(service, None)

    def _push_deadline(self, entry: _Entry) -> None:
        expires = entry.expires_at()
        if expires is not None:
            deadline = (expires, *entry.instance.key)
            heapq.heappush(self._deadlines, deadline)
            # The reaper sleeps until the earliest deadline: only a new earliest one moves
            # its wake-up (waking it for every registration cost a task step each).
            if self._deadlines[0] is deadline:
                self._reaper_wakeup.set()

    def _announce(self, service: str, change: Change | None) -> None:
        self._index += 1
        self._service_index[service] = self._index
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
