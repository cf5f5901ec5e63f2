"""The registry's live state: instances, and the one door to their leases (leases.py), the
modify index and blocking waits (changes.py) and the per-key locks (locks.py).

Writes go to the store first and are applied in memory only once durable, so
whatever a reader saw survives a crash. Heartbeats touch memory only: a lease
is a promise about the next few seconds, not something worth an fsync.

Replicas (a SharedRegistryStore: PostgreSQL) each keep this whole map in memory and follow
each other's writes: the composition root feeds `remote_changed` from LISTEN, calls
`resync` after every (re)connection of the listener and runs `run_replication`, which
applies what was notified, flushes this replica's heartbeats once a second and polls for
what a notification may have missed. A heartbeat to any replica keeps the lease; only
the replica that reaps (`reaping`) removes a lapsed instance, and the store removes it
only if no replica has renewed it since (the database's clock decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from registry.abc import Key, RegistryStore, SharedRegistryStore, StoredRow

from .changes import Change, ChangeKind, Changes
from .errors import Conflict, StoreUnavailable, UnknownInstance
from .leases import MAX_REAPER_SLEEP, Entries, Entry, Leases
from .locks import KeyLocks
from .model import HealthState, Instance

log = logging.getLogger(__name__)

# Replicas: this replica's heartbeats are written, and the store polled, this often.
HEARTBEAT_FLUSH = 1.0
# How late a heartbeat to another replica may be seen here (its flush, then this one's
# poll): added to every lease deadline on a shared store, never to SQLite's.
LEASE_SLACK = 2 * HEARTBEAT_FLUSH
APPLY_BATCH = 500  # keys read back and applied under their locks at a time
COUNTED_PER_TURN = 2000  # instances `health_counts` counts between turns of the loop
_STATES = tuple(HealthState)  # the order of `health_counts`
_POSITION = {state: n for n, state in enumerate(_STATES)}

__all__ = ["Catalog", "Change", "ChangeKind", "Clock", "HealthSource", "InstanceStatus"]


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class HealthSource(Protocol):
    """Where health comes from (the monitor's probes); the registry only adds lease lapses."""

    def health_of(self, instance: Instance) -> HealthState: ...


class UnknownHealth:
    def health_of(self, instance: Instance) -> HealthState:
        return HealthState.UNKNOWN


@dataclass(frozen=True, kw_only=True, slots=True)
class InstanceStatus:
    """An instance as readers see it."""

    instance: Instance
    health: HealthState
    lease_expires_in: float | None  # seconds; negative once lapsed
    lapsed: bool


class Catalog:
    """The registry's one door: register, heartbeat, deregister and the reads.

    Many methods, kept on purpose: callers (routes, the checker, the root) see one object;
    seven are one-line doors to Leases and Changes, which hold that logic; the rest is the
    instance map, its writes and its reads, and (replicas) the application of the other
    replicas' writes to it."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        clock: Clock | None = None,
        health: HealthSource | None = None,
        reaping: Callable[[], bool] = lambda: True,
        lease_slack: Callable[[], float] | None = None,
    ) -> None:
        """`reaping`: whether this replica removes lapsed instances now (the root wires it
        to leadership); the others only mark them lapsed. Always true for one daemon.
        `lease_slack()`: added to every lease deadline; by default LEASE_SLACK on a shared
        store (heartbeats to other replicas reach this one that late), 0 on SQLite; the
        root makes it 0 while this replica is the only live one, so a lease lapses at
        exactly its ttl there too."""
        self._store = store
        self._shared = store if isinstance(store, SharedRegistryStore) else None
        self._clock = clock or SystemClock()
        self.health: HealthSource = health or UnknownHealth()
        self._services: Entries = {}
        self._changes = Changes()
        self._leases = Leases(
            entries=self._services,
            changes=self._changes,
            monotonic=self._clock.monotonic,
            remove=self._remove_durably,
            slack=(
                (lambda: LEASE_SLACK if self._shared is not None else 0.0)
                if lease_slack is None
                else lease_slack
            ),
            reaping=reaping,
        )
        self._renewed_here: set[Key] = set()  # heartbeats not yet flushed (replicas)
        self._notified: set[Key] = set()  # keys other replicas wrote, not yet applied
        self._replicate = asyncio.Event()
        self._locks = KeyLocks()
        self._declared: frozenset[str] = frozenset()
        self.heartbeats_total = 0

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
            self._put(Entry(instance=replace(instance, static=True), renewed_at=now))
        for instance in instances:
            if self._entry(instance.service, instance.id) is not None:
                log.warning("registered %s/%s shadowed by a static instance", *instance.key)
                continue
            self._put(Entry(instance=instance, renewed_at=now))
        # Above anything a client saw before the restart (see ARCHITECTURE.md, "index").
        changes = self._changes
        changes.index = index + 1
        for service in self._services:
            changes.service_index[service] = changes.index
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
                    self._changes.announce(
                        entry.instance.service,
                        Change(kind=ChangeKind.DEREGISTERED, instance=entry.instance),
                    )
        for key, instance in wanted.items():
            current = self._entry(*key)
            if current is not None and current.instance == instance:
                continue
            kind = ChangeKind.REGISTERED if current is None else ChangeKind.UPDATED
            self._put(Entry(instance=instance, renewed_at=now))
            self._changes.announce(instance.service, Change(kind=kind, instance=instance))
        for service in self._declared:
            self._changes.service_index.setdefault(service, self._changes.index)

    async def run_reaper(self) -> None:
        """Make lease removals durable (Leases.run_reaper). Owned by the app; cancelled on
        shutdown."""
        await self._leases.run_reaper()

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._changes.add_listener(listener)

    # -- writes --------------------------------------------------------------------

    async def register(
        self, instance: Instance, *, on_write: Callable[[bool], None] | None = None
    ) -> tuple[InstanceStatus, bool]:
        """Register or update (service, id). Returns the instance as stored, and whether new.
        `on_write(created)` runs just before a write (none for an unchanged renewal)."""
        async with self._locks.hold(instance.key):
            self._leases.expire_due()
            current = self._entry(instance.service, instance.id)
            if current is not None and current.instance.static:
                raise Conflict(f"{instance.service}/{instance.id} is defined in config.yaml")
            created = current is None or current.removed
            if current is not None and not created:
                if current.instance.same_registration(instance) and not current.lapsed:
                    current.renewed_at = self._clock.monotonic()
                    if self._shared is not None:
                        self._renewed_here.add(instance.key)
                    return self._status(current, current.renewed_at), False
                instance = replace(instance, registered_at=current.instance.registered_at)
            elif not instance.registered_at:
                instance = replace(instance, registered_at=instance.updated_at or self.now())
            if on_write is not None:
                on_write(created)
            await self._durably(self._store.save(instance, self._changes.index + 1))
            entry = Entry(instance=instance, renewed_at=self._clock.monotonic())
            self._put(entry)
            kind = ChangeKind.REGISTERED if created else ChangeKind.UPDATED
            self._changes.announce(instance.service, Change(kind=kind, instance=instance))
            return self._status(entry, entry.renewed_at), created

    def heartbeat(self, service: str, instance_id: str) -> InstanceStatus:
        """Renew a lease. In memory only; a lapsed instance comes back at once."""
        entry = self._registered(service, instance_id)
        if entry.instance.ttl is None:
            raise Conflict(f"{service}/{instance_id} was registered without a ttl")
        self.heartbeats_total += 1
        now = self._clock.monotonic()
        self._renew(entry, now)
        if self._shared is not None:
            self._renewed_here.add(entry.instance.key)
        return self._status(entry, now)

    def _renew(self, entry: Entry, renewed_at: float) -> None:
        """The lease was renewed at `renewed_at` (here or, later seen, on another replica);
        a lapsed instance whose lease that renewal covers comes back at once."""
        if renewed_at <= entry.renewed_at or entry.removed:
            return
        entry.renewed_at = renewed_at
        expires = entry.expires_at()
        now = self._clock.monotonic()
        if entry.lapsed and expires is not None and now < expires + self._leases.slack:
            entry.lapsed = False
            self._leases.push(entry)
            self._changes.announce(
                entry.instance.service, Change(kind=ChangeKind.RENEWED, instance=entry.instance)
            )

    async def deregister(self, service: str, instance_id: str) -> None:
        async with self._locks.hold((service, instance_id)):
            entry = self._registered(service, instance_id)
            await self._durably(self._store.delete(service, instance_id, self._changes.index + 1))
            self._drop(entry)
            self._changes.announce(
                service, Change(kind=ChangeKind.DEREGISTERED, instance=entry.instance)
            )

    def _registered(self, service: str, instance_id: str) -> Entry:
        """The live, API-managed entry: 404 when unknown, 409 when it comes from config."""
        self._leases.expire_due()
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
            self._changes.announce(service, None)

    # -- reads ---------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The registry's modify index (as of the last read or write, which apply due lapses).

        It never goes down on one daemon: every change here raises it by one. Replicas each
        count their own (a health transition or a lapse is seen, and counted, by each), and
        a change another replica made raises this one's to at least the index it was made
        at (a Lamport clock): once a change has reached every replica, each one's index is
        at or above the index its writer answered with. An index from a replica that is
        ahead (more local changes) is one from the future here, answered at once, and the
        client starts over from this replica's index, as Consul's clients do."""
        return self._changes.index

    @property
    def expirations_total(self) -> int:
        return self._leases.expirations_total

    def service_index(self, service: str) -> int:
        self._leases.expire_due()
        return self._changes.service_index.get(service, 0)

    def services(self) -> dict[str, list[InstanceStatus]]:
        self._leases.expire_due()
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

    async def health_counts(self, per_turn: int | None = None) -> dict[str, list[int]]:
        """Live instances per service (sorted, as `services()` lists them) and health state
        (counts in `HealthState` order), `per_turn` instances between turns of the loop: a
        scrape at 10,000 instances counted them in one go, 60-70 ms the loop served no one.
        Lapses due are applied first; changes made meanwhile may or may not be counted."""
        per_turn = per_turn or COUNTED_PER_TURN
        self._leases.expire_due()
        names = sorted(self._declared.union(self._services))
        counts = {name: [0] * len(_STATES) for name in names}
        health_of, critical = self.health.health_of, _POSITION[HealthState.CRITICAL]
        since_turn = 0
        for name in names:
            tally = counts[name]
            for entry in list(self._services.get(name, {}).values()):
                if not entry.removed:
                    tally[critical if entry.lapsed else _POSITION[health_of(entry.instance)]] += 1
                since_turn += 1
                if since_turn == per_turn:
                    await asyncio.sleep(0)
                    since_turn = 0
        return counts

    def service_names(self) -> list[str]:
        """The names `services()` lists, sorted, without building a status per instance."""
        self._leases.expire_due()
        return sorted(self._declared.union(self._services))

    def instances(self, service: str | None = None) -> list[InstanceStatus]:
        """Instances in a stable order (service, id), optionally of one service."""
        self._leases.expire_due()
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
        await self._changes.wait(service, lambda: self._passed(service, index), wait)
        return self.service_index(service)

    def _passed(self, service: str, index: int) -> bool:
        return self.service_index(service) > index or index > self._changes.index

    # -- replicas ------------------------------------------------------------------

    def remote_changed(self, payload: str) -> None:
        """A notification from the store's channel (the root's Listener calls this): the
        keys it names are read back and applied by `run_replication` at once."""
        if self._shared is None:
            return
        keys = self._shared.notified(payload)
        if keys:
            self._notified.update(keys)
            self._replicate.set()

    async def resync(self) -> None:
        """Read every registered instance back and apply it, dropping those gone from the
        store: after every (re)connection of the listener, as notifications sent while it
        was down are lost."""
        shared = self._require_shared()
        keys = set(await shared.keys())
        keys.update(
            entry.instance.key
            for entries in self._services.values()
            for entry in entries.values()
            if not entry.instance.static
        )
        await self._apply_keys(keys)

    async def run_replication(self) -> None:
        """Follow the other replicas, for as long as it runs (the root owns the task):
        notified keys at once; every HEARTBEAT_FLUSH seconds, this replica's heartbeats
        written in one write and the store polled for writes and heartbeats since the
        previous poll. A failing round is tried again (and logged once per outage)."""
        shared = self._require_shared()
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + HEARTBEAT_FLUSH
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sync - loop.time())):
                    await self._replicate.wait()
            self._replicate.clear()
            try:
                if self._notified:
                    keys, self._notified = self._notified, set()
                    await self._apply_or_keep(keys)
                if loop.time() >= next_sync:
                    next_sync = loop.time() + HEARTBEAT_FLUSH
                    await self._sync(shared)
                if failing:
                    failing = False
                    log.warning("registry: following the other replicas again")
            except Exception as exc:
                if not failing:  # once per outage, not once a second
                    failing = True
                    log.warning("registry: following the other replicas fails (%s)", exc)

    async def _sync(self, shared: SharedRegistryStore) -> None:
        renewed, self._renewed_here = self._renewed_here, set()
        if renewed:
            try:
                await shared.save_heartbeats(renewed)
            except Exception:
                self._renewed_here |= renewed
                raise
        changed, renewals = await shared.poll()
        now = self._clock.monotonic()
        for key, age in renewals:
            entry = self._entry(*key)
            if entry is not None and not entry.instance.static:
                self._renew(entry, now - age)
        await self._apply_or_keep(set(changed))

    async def _apply_or_keep(self, keys: set[Key]) -> None:
        try:
            await self._apply_keys(keys)
        except Exception:
            self._notified |= keys  # the next round tries them again
            raise

    async def _apply_keys(self, keys: Iterable[Key]) -> None:
        """Read `keys` back under their locks (so no local write to them interleaves) and
        apply each. Locks are taken in key order; other holders take one at a time."""
        shared = self._require_shared()
        ordered = sorted(set(keys))
        for start in range(0, len(ordered), APPLY_BATCH):
            batch = ordered[start : start + APPLY_BATCH]
            async with contextlib.AsyncExitStack() as held:
                for key in batch:
                    await held.enter_async_context(self._locks.hold(key))
                for row in await shared.read_rows(batch):
                    self._apply_row(row)

    def _apply_row(self, row: StoredRow) -> None:
        """Memory made to match the store's row (its key's lock held): registered, updated,
        renewed or gone, announced as a local change is, the index raised to the row's."""
        entry = self._entry(*row.key)
        if entry is not None and entry.instance.static:
            return  # config's instance shadows a registered one, as on load
        now = self._clock.monotonic()
        if row.instance is None:
            if entry is not None:
                self._drop(entry)
                if not entry.removed:  # else its removal was announced here already
                    change = Change(kind=ChangeKind.DEREGISTERED, instance=entry.instance)
                    self._changes.announce(row.key[0], change, at=row.index)
            return
        age = row.heartbeat_age  # None: renewed here last, as memory knows
        if entry is not None and not entry.removed:
            if entry.instance == row.instance:
                if age is not None:
                    self._renew(entry, now - age)
                return
            renewed_at = entry.renewed_at if age is None else max(now - age, entry.renewed_at)
        else:
            renewed_at = now if age is None else now - age
        kind = ChangeKind.REGISTERED if entry is None or entry.removed else ChangeKind.UPDATED
        self._put(Entry(instance=row.instance, renewed_at=renewed_at))
        self._changes.announce(row.key[0], Change(kind=kind, instance=row.instance), at=row.index)

    def _require_shared(self) -> SharedRegistryStore:
        if self._shared is None:
            raise TypeError("replication needs a shared store (PostgreSQL)")
        return self._shared

    # -- load shedding -------------------------------------------------------------

    def pause_expiry(self) -> None:
        """The daemon is shedding load, heartbeats among it: no lease lapses meanwhile."""
        self._leases.pause_expiry()

    def resume_expiry(self) -> None:
        """Every lease still held is renewed from now (a whole ttl to come back)."""
        self._leases.resume_expiry()

    # -- internals -----------------------------------------------------------------

    async def _remove_durably(self, entry: Entry) -> None:
        service, instance_id = entry.instance.key
        async with self._locks.hold(entry.instance.key):
            if self._entry(service, instance_id) is not entry:
                return  # registered again meanwhile: the new registration stands
            try:
                if self._shared is not None:
                    # Removed only if no replica renewed it since; else it is back.
                    row = await self._shared.expire(service, instance_id, self._changes.index)
                    if row is not None:
                        self._apply_row(row)
                        return
                else:
                    await self._store.delete(service, instance_id, self._changes.index)
            except Exception:
                log.exception("could not remove lapsed %s/%s; will retry", service, instance_id)
                self._leases.requeue(entry)
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

    def _status(self, entry: Entry, now: float) -> InstanceStatus:
        expires = entry.expires_at()
        health = HealthState.CRITICAL if entry.lapsed else self.health.health_of(entry.instance)
        return InstanceStatus(
            instance=entry.instance,
            health=health,
            lease_expires_in=None if expires is None else expires - now,
            lapsed=entry.lapsed,
        )

    def _entry(self, service: str, instance_id: str) -> Entry | None:
        return self._services.get(service, {}).get(instance_id)

    def _put(self, entry: Entry) -> None:
        self._services.setdefault(entry.instance.service, {})[entry.instance.id] = entry
        self._leases.push(entry)

    def _drop(self, entry: Entry) -> None:
        service, instance_id = entry.instance.key
        entries = self._services.get(service, {})
        entries.pop(instance_id, None)
        if not entries:
            self._services.pop(service, None)
