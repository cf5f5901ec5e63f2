"""The health checker: every instance in the registry, probed on the timetable.

It follows the registry (an instance is probed from the moment it registers
until it leaves, no restart), runs each probe as an owned task, hands the
result to the health book, the result store and the metrics, and moves the
instance between `interval` and `down_interval`.

Probe results are handled on the API's event loop (the network part runs in probe
workers, monitor/probing/worker.py), so probing is capped (`server.probe_budget`): an
instance's own `interval` is always kept, and the faster probes `down_interval`
asks for come out of a global budget of probes per second, and so do the first
probes of new instances (they are `unknown`, which probes at `down_interval`
too). When many instances are down or new at once they share it, each backing
off towards its `interval`, so a mass outage or a burst of registrations costs
the loop no more than the budget (ARCHITECTURE.md, Health checking).

With several replicas each probes only the instances in the shards it owns
(`set_shards`, fed from the membership); every replica keeps every instance's
health, the owners' states applied through SharedHealth (monitor/health/shared.py).
One daemon owns every shard.

Per-instance state is kept small: slotted objects, the probe counters in shared
arrays (ProbeStats), no asyncio objects kept between probes, and the last result
without its body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from monitor.cluster.shards import shard_of
from monitor.health.book import HealthBook, Key
from monitor.health.results import ProbeResults, bucket_index
from monitor.health.shared import SharedHealth
from monitor.health.states_abc import HealthStateStore
from monitor.probing.probe import Probe, ProbeResult, resolve_probe
from monitor.probing.prober import Prober
from monitor.slo.book import SloBook
from registry import Catalog, Change, ChangeKind, Instance, ProbeSpec, ProbeType
from scheduler import Scheduler, Timetable

log = logging.getLogger(__name__)

NEW_INSTANCE_SPREAD = 1.0
MAX_CACHED_PROBES = 10_000


class ProbeStats:
    """Counters behind the probe metrics, every instance's together: one slot per
    instance in a few flat arrays (struct of arrays), ~130 bytes a slot where an
    object per instance, its histogram and its boxed numbers took ~330."""

    def __init__(self, boundaries: tuple[float, ...]) -> None:
        self.boundaries = boundaries
        self._width = len(boundaries)
        self._successes = array("Q")
        self._failures = array("Q")
        self._duration_sums = array("d")
        self._last_ok = array("b")  # -1: no probe yet
        self._certificates = array("d")  # NaN: none seen
        self._buckets = array("Q")  # per slot, `_width` counts per boundary, not cumulative
        self._free: list[int] = []

    def allocate(self) -> int:
        """A slot for a new instance, all counters zero."""
        if self._free:
            slot = self._free.pop()
            self._successes[slot] = self._failures[slot] = 0
            self._duration_sums[slot] = 0.0
            self._last_ok[slot] = -1
            self._certificates[slot] = math.nan
            start = slot * self._width
            self._buckets[start : start + self._width] = array("Q", bytes(8 * self._width))
            return slot
        self._successes.append(0)
        self._failures.append(0)
        self._duration_sums.append(0.0)
        self._last_ok.append(-1)
        self._certificates.append(math.nan)
        self._buckets.frombytes(bytes(8 * self._width))
        return len(self._successes) - 1

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def observe(self, slot: int, result: ProbeResult, ok: bool, *, counted: bool = True) -> None:
        """Take one probe; `counted=False` (maintenance) updates only the last result.

        Probes inside a maintenance window stay out of the counters and the
        histogram, so the Prometheus-side SLIs (increases of those series)
        exclude maintenance time exactly as the daemon's own SLOs do.
        """
        self._last_ok[slot] = ok
        if result.certificate_expires_at is not None:
            self._certificates[slot] = result.certificate_expires_at
        if not counted:
            return
        if not ok:
            self._failures[slot] += 1
            return
        self._successes[slot] += 1
        self._duration_sums[slot] += result.response_time
        self._buckets[slot * self._width + bucket_index(self.boundaries, result.response_time)] += 1

    def row(self, slot: int) -> StatsRow:
        last_ok, certificate = self._last_ok[slot], self._certificates[slot]
        start = slot * self._width
        buckets = tuple(self._buckets[start : start + self._width])
        return StatsRow(
            self._successes[slot],
            self._failures[slot],
            buckets if self._successes[slot] else (),
            self._duration_sums[slot],
            None if last_ok < 0 else bool(last_ok),
            None if math.isnan(certificate) else certificate,
        )


class StatsRow(NamedTuple):
    """One instance's counters, copied out of ProbeStats (metrics.py renders them)."""

    successes: int
    failures: int
    buckets: tuple[int, ...]  # () before the first success
    duration_sum: float
    last_ok: bool | None
    certificate_expires_at: float | None


class ProbeBucket:
    """The extra probes `down_interval` asks for, all instances together: at most
    `per_second` a second, from a token bucket holding one second's worth.

    Probes an instance's own `interval` asks for are not counted: they are the load
    the fleet has when all is well. So an outage, however large, costs at most
    `per_second` probes a second more than that.
    """

    def __init__(self, per_second: float, clock: Callable[[], float]) -> None:
        self.per_second, self._clock = per_second, clock
        self._tokens, self._at = per_second, clock()
        # Held back from down instances for first probes: a new instance is probed before
        # one already known to be down is probed again (down instances back off first).
        self._reserve = max(1.0, per_second / 10)

    def take(self, *, first: bool = False) -> bool:
        """True if the budget has room for one more extra probe now; a `first` probe (of an
        instance not yet probed) may use the reserve the others leave."""
        now = self._clock()
        elapsed, self._at = now - self._at, now
        self._tokens = min(self.per_second, self._tokens + elapsed * self.per_second)
        if self._tokens < (1 if first else 1 + self._reserve):
            return False
        self._tokens -= 1
        return True


@dataclass(slots=True)
class _Target:
    url: str
    probe: Probe
    stats: int  # its slot in HealthChecker.stats
    gap: float  # the timetable's interval for it now: `interval`, or a down one
    last_start: float | None = None  # loop time; a new instance's: its registration
    busy: bool = False  # a probe of it is running (its task is in HealthChecker._tasks)
    first: bool = False  # registered and not yet probed: its probe goes before re-probes


class HealthChecker:
    def __init__(
        self,
        *,
        catalog: Catalog,
        book: HealthBook,
        prober: Prober,
        store: ProbeResults,
        scheduler: Scheduler,
        defaults: ProbeSpec,
        service_probes: dict[str, ProbeSpec],
        slos: SloBook | None = None,
        budget: float = 250.0,
        clock: Callable[[], float] | None = None,
        states: HealthStateStore | None = None,
    ) -> None:
        """`budget`: probes per second (ProbeBucket); `clock`: monotonic seconds; `states`:
        where replicas share health states (None: one daemon, nothing shared)."""
        self.catalog, self.book, self.prober, self.store = catalog, book, prober, store
        self.slos = slos
        self._defaults, self._service_probes = defaults, service_probes
        self.timetable: Timetable[Key] = Timetable(scheduler, self._start_probe, name="probes")
        self._clock = clock or time.monotonic
        self.budget = ProbeBucket(budget, self._clock)
        self.targets: dict[Key, _Target] = {}
        self.stats = ProbeStats(store.boundaries)
        self._down: set[Key] = set()  # instances probed at a down interval
        self._tasks: set[asyncio.Task[None]] = set()
        self._probes: dict[tuple[str, str], Probe] = {}
        self._owned: frozenset[int] | None = None  # None: every shard (one daemon)
        self._started = self._closed = False
        self.shared = SharedHealth(states, book, self.owns) if states is not None else None
        book.announce_only(self.owns)

    def owns(self, key: Key) -> bool:
        """Whether this replica probes (and speaks for) `key`."""
        return self._owned is None or shard_of(*key) in self._owned

    def set_shards(self, owned: Collection[int]) -> None:
        """Probe the instances of the `owned` shards from now on (the membership changed;
        before `start`: the first members seen).

        Lost instances stop at once (a probe running finishes unrecorded); gained ones are
        probed within a second, owed whatever the budget, going on from the state their
        last owner stored: a slot may be probed twice in a handover, none skipped."""
        shards = frozenset(owned)
        if shards == self._owned:
            return
        self._owned = shards
        if not self._started:
            return  # `start` tracks the owned ones, spread over their interval
        lost = [key for key in self.targets if not self.owns(key)]
        for key in lost:
            self._drop(key)
        if self.shared is not None:
            self.shared.release(lost)
        for status in self.catalog.instances():
            instance = status.instance
            if instance.key not in self.targets and self.owns(instance.key):
                self._track(instance, handover=True)

    def probe_for(self, service: str, instance: ProbeSpec | None) -> Probe:
        """The effective settings: defaults, then the service's config, then the instance's.

        A fleet shares a handful of settings: one Probe object each, not one per instance.
        """
        key = (service, instance.model_dump_json(exclude_none=True) if instance else "")
        probe = self._probes.get(key)
        if probe is None:
            layers = [self._defaults, self._service_probes.get(service), instance]
            probe = resolve_probe(layers)  # raises ConditionError (a ValueError)
            if len(self._probes) >= MAX_CACHED_PROBES:
                self._probes.clear()
            self._probes[key] = probe
        return probe

    def configure(self, defaults: ProbeSpec, service_probes: dict[str, ProbeSpec]) -> None:
        """New probe settings (config reload): instances whose effective probe changed are
        rescheduled with it; the rest keep their slot."""
        self._defaults, self._service_probes = defaults, service_probes
        self._probes.clear()
        for status in self.catalog.instances():
            self._track(status.instance)

    async def open(self) -> None:
        """With several replicas: create the shared states' table and read it, so `start`
        goes on from the stored states. After the registry has loaded, before `start`."""
        if self.shared is not None:
            await self.shared.open()

    def start(self) -> None:
        # Restored instances spread their first probe over one interval (no herd at start);
        # instances that register later are probed within a second, budget permitting.
        for status in self.catalog.instances():
            self._track(status.instance, spread=True)
        self.catalog.add_listener(self._on_change)
        self.timetable.start()
        self._started = True
        if self.shared is not None:
            self.shared.start()

    async def close(self) -> None:
        self._closed = True  # answers still coming from workers are dropped
        self.timetable.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()

    def _on_change(self, change: Change) -> None:
        key = change.instance.key
        if change.kind in (ChangeKind.REGISTERED, ChangeKind.UPDATED):
            self._track(change.instance)
        elif change.kind is ChangeKind.DEREGISTERED:
            if self.shared is not None:
                self.shared.forget(key, owned=self.owns(key))
            self._drop(key)
            self.book.forget(key)
        elif change.kind in (ChangeKind.LAPSED, ChangeKind.RENEWED):
            self.book.set_lapsed(key, change.kind is ChangeKind.LAPSED)

    def _drop(self, key: Key) -> None:
        self.timetable.remove(key)
        gone = self.targets.pop(key, None)
        if gone is not None:
            self.stats.release(gone.stats)
        self._down.discard(key)

    def _track(self, instance: Instance, *, spread: bool = False, handover: bool = False) -> None:
        try:
            probe = self.probe_for(instance.service, instance.probe)
        except ValueError as exc:  # checked at registration; config can still disagree
            log.error("not probing %s/%s: %s", *instance.key, exc)
            return
        key = instance.key
        new = self.book.tracker(key) is None
        # Every instance, probed here or not: its health is shown by every replica, and
        # unprobed ones' lease lapses still count.
        tracker = self.book.track(key, probe)
        if new and self.shared is not None:
            self.shared.restore(key)  # another replica (or this one's last life) probed it
        if not self.owns(key):
            return
        current = self.targets.get(key)
        stats = current.stats if current else self.stats.allocate()
        target = self.targets[key] = _Target(instance.url, probe, stats, probe.interval)
        if probe.type == ProbeType.NONE:
            self.timetable.remove(key)
            self._down.discard(key)
        elif current is None and not spread:
            # New, so `unknown`: probed like a down instance, its first probe within a
            # second an extra on the budget; refused, it backs off towards `interval`,
            # counted from now. A burst of registrations so costs at most the budget.
            self._down.add(key)
            target.gap, target.last_start = self._down_gap(probe), self._clock()
            target.first = True
            first = min(target.gap, NEW_INSTANCE_SPREAD)
            self.timetable.add(key, target.gap, first_in=random.uniform(0, first))
        elif current is None and handover:
            # Its last owner probed it on its own timetable: the next slot may be now.
            if tracker.wants_down_interval:
                self._down.add(key)
                target.gap = self._down_gap(probe)
            first = min(target.gap, NEW_INSTANCE_SPREAD)
            self.timetable.add(key, target.gap, first_in=random.uniform(0, first))
        elif current is None or current.probe != probe:
            first = probe.interval if spread else min(probe.interval, NEW_INSTANCE_SPREAD)
            self.timetable.add(key, probe.interval, first_in=random.uniform(0, first))
        else:  # same probe, same slot: keep its pace
            target.gap, target.last_start = current.gap, current.last_start

    def _start_probe(self, key: Key) -> None:
        target = self.targets.get(key)
        if target is None or target.busy:
            return  # the previous probe of this instance is still within its timeout
        now, last = self._clock(), target.last_start
        # Skipping this slot would leave the instance unprobed for longer than its
        # interval: it runs whatever the budget. Earlier ones are extras, on the budget.
        owed = last is None or now + target.gap - last > target.probe.interval
        if not owed and not self.budget.take(first=target.first):
            self._back_off(key, target)
            return
        target.last_start = now
        target.busy, target.first = True, False
        if self.prober.send(target.url, target.probe, partial(self._probed, key, target)):
            return  # a worker runs it; _probed takes the result
        task = asyncio.create_task(self._probe(key, target), name=f"probe:{key[0]}/{key[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, key: Key, target: _Target) -> None:
        try:
            result = await self.prober.run(target.url, target.probe)
        finally:
            target.busy = False
        self._probed(key, target, result)

    def _probed(self, key: Key, target: _Target, result: ProbeResult) -> None:
        target.busy = False
        if self._closed or self.targets.get(key) is not target:
            return  # deregistered or re-registered meanwhile, or the checker has stopped
        verdict = self.book.record(key, result)
        if verdict is None:
            return
        tracker = self.book.tracker(key)
        if self.shared is not None and tracker is not None:
            self.shared.observe(key, tracker)
        maintenance = self.book.in_maintenance(key[0])
        self.stats.observe(target.stats, result, verdict.ok, counted=not maintenance)
        self.store.add(
            key[0],
            key[1],
            result,
            ok=verdict.ok,
            failing=[f.condition for f in verdict.failing],
            maintenance=maintenance,
        )
        if self.slos is not None:
            self.slos.record(
                key[0],
                self.catalog.now(),  # the daemon's clock, the one SLOs are evaluated on
                ok=verdict.ok,
                response_time=result.response_time,
                maintenance=maintenance,
            )
        if tracker is not None:
            if tracker.wants_down_interval:
                self._down.add(key)
                self._pace(key, target, self._down_gap(target.probe))
            else:
                self._down.discard(key)
                self._pace(key, target, target.probe.interval)

    def _down_gap(self, probe: Probe) -> float:
        """A down instance's share of the budget: `down_interval` while the budget has
        room for every down instance at its own, longer as more are down, `interval` at most.
        """
        if probe.down_interval >= probe.interval:
            return probe.down_interval  # slower while down: no extra probes to budget
        share = len(self._down) / self.budget.per_second
        return min(probe.interval, max(probe.down_interval, share))

    def _back_off(self, key: Key, target: _Target) -> None:
        """The budget refused an extra probe: ask for fewer (its share is stale). A first
        probe keeps its share instead: doubling towards `interval` could leave a new
        instance `unknown` for an hour during an outage."""
        probe = target.probe
        if target.first:
            self._pace(key, target, self._down_gap(probe))
        else:
            self._pace(key, target, min(probe.interval, max(probe.down_interval, target.gap * 2)))

    def _pace(self, key: Key, target: _Target, gap: float) -> None:
        """Probe `key` every `gap` seconds from now on, counted from its last start."""
        if gap == target.gap:
            return
        if gap < target.gap:
            self.timetable.set_interval(key, gap)  # moves the next run earlier
        else:  # set_interval would put the next run on the new grid, maybe sooner
            since = self._clock() - (target.last_start or self._clock())
            self.timetable.add(key, gap, first_in=max(0.0, gap - since))
        target.gap = gap


def latency_buckets(configured: Sequence[float], thresholds: Sequence[float]) -> tuple[float, ...]:
    """Histogram boundaries: the configured ones plus every SLO latency threshold."""
    return tuple(sorted(set(configured) | set(thresholds)))
