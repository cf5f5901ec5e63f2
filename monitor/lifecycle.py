"""Starting and stopping the parts, in order: storage and the registry first, then
probing and SLOs, then workflows, then the bus's listeners; stopped the other way.

Each stage is an aiohttp cleanup context over the parts the root built (parts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from registry import StoreUnavailable
from workflows.engine import Engine

from .cluster.leadership import Leadership
from .convert import static_instances
from .keys import AUDIT, HEAP, REAPER
from .parts import Parts
from .reload import Reloader

if TYPE_CHECKING:
    from .relay import EventRelay

log = logging.getLogger(__name__)

Context = Callable[[web.Application], AsyncIterator[None]]

SLO_INTERVAL = 30.0
SLO_METRICS_INTERVAL = 5.0
FLUSH_INTERVAL = 1.0
PRUNE_INTERVAL = 3600.0
FREEZE_INTERVAL = 1.0
# Allocations between young collections (CPython's default is 700). A young collection costs
# about what the objects of the requests in flight cost to walk, however many were allocated
# since the last: 1.5 ms at 700 under 32 concurrent registrations, 2.6 ms at 3,000, so one
# every 3,000 allocations walks them a quarter as often (GC time per registration 45 -> 10
# us, bench.audit). Pauses stay under 8 ms (5,000: 12 ms with 10,000 instances probed).
YOUNG_THRESHOLD = 3000
OPEN_RETRY_MIN, OPEN_RETRY_MAX = 0.5, 10.0  # an engine open that storage refused


def contexts(parts: Parts, reloader: Reloader | None, *, signals: bool) -> list[Context]:
    """The stages in start order (aiohttp stops them in reverse)."""
    stages = [
        _registry(parts),
        _monitor(parts),
        _workflows(parts),
        _listeners(parts),
    ]
    if reloader is not None:
        stages.append(_reloader(reloader, signals=signals))
    stages.append(_keep_heap_frozen)
    return stages


def _registry(parts: Parts) -> Context:
    async def run(app: web.Application) -> AsyncIterator[None]:
        config, database, catalog = parts.config, parts.database, parts.catalog
        await database.open()
        try:
            await parts.membership.start()
            restored = await catalog.load(
                static_instances(config), declared=(s.name for s in config.services)
            )
            log.info("registry restored %d registered instance(s)", restored)
            await parts.trail.store.open()
            app[AUDIT] = asyncio.create_task(parts.trail.run(), name="audit-refusals")
            app[REAPER] = asyncio.create_task(catalog.run_reaper(), name="registry-reaper")
            async with _replicated(parts):
                yield
            for task in (app[REAPER], app[AUDIT]):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await parts.membership.stop()  # leaves: the others take its share at once
            await database.close()

    return run


@contextlib.asynccontextmanager
async def _replicated(parts: Parts) -> AsyncIterator[None]:
    """On PostgreSQL, what other replicas change reaches this one: NOTIFY names each
    changed instance (re-read and applied at once), a poll behind it catches what a lost
    notification missed, and every (re)connection of the listener re-reads everything."""
    url, catalog = parts.config.storage.url, parts.catalog
    if url is None:
        yield
        return
    from registry.stores.postgres import CHANNEL as REGISTRY_CHANNEL

    from .storage.postgres import Listener

    listener = Listener(
        url,
        [REGISTRY_CHANNEL],
        lambda _, payload: catalog.remote_changed(payload),
        catalog.resync,
    )
    listener.start()
    replication = asyncio.create_task(catalog.run_replication(), name="registry-replication")
    try:
        yield
    finally:
        replication.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replication
        await listener.stop()


def _owned_shards(parts: Parts) -> set[int]:
    membership = parts.membership
    return {shard for shard, owner in enumerate(membership.owners()) if owner == membership.key}


@contextlib.asynccontextmanager
async def _sharded(parts: Parts) -> AsyncIterator[None]:
    """On PostgreSQL, probing is sharded over the live members (each instance probed by one
    replica, a dead one's share taken at the next membership change), and the health each
    prober stores reaches the others (NOTIFY hms_health, a poll, a re-read on reconnect)."""
    url, checker, membership = parts.config.storage.url, parts.checker, parts.membership
    if url is None or checker.shared is None:
        yield
        return
    from .health.stores.states_postgres import CHANNEL as HEALTH_CHANNEL
    from .storage.postgres import Listener

    checker.set_shards(_owned_shards(parts))
    membership.on_change(lambda _: checker.set_shards(_owned_shards(parts)))
    shared = checker.shared
    listener = Listener(url, [HEALTH_CHANNEL], lambda _, __: shared.apply_remote(), shared.resync)
    listener.start()
    try:
        yield
    finally:
        await listener.stop()


def _monitor(parts: Parts) -> Context:
    """Scheduler, probes, result flushing; started after the registry, stopped before it."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        scheduler, checker, results = parts.scheduler, parts.checker, parts.results
        slos, clock = parts.slos, parts.catalog.now
        await results.create_tables(clock())
        await slos.load(clock())
        await parts.prober.start()
        await checker.open()  # on PostgreSQL: the health the other replicas last stored
        sharding = contextlib.AsyncExitStack()
        await sharding.enter_async_context(_sharded(parts))  # the shards before the start
        scheduler.start()
        checker.start()

        async def flush() -> None:
            # While storage fails (Database logs it once) both keep their rows for the next go.
            with contextlib.suppress(StoreUnavailable):
                await results.flush(clock())
                await slos.flush()

        scheduler.every("results.flush", FLUSH_INTERVAL, flush)
        scheduler.every("slo.evaluate", SLO_INTERVAL, lambda: slos.evaluate(clock()))
        # Renders the SLO metrics early in each minute, so scrapes find the text ready.
        scheduler.every("slo.metrics", SLO_METRICS_INTERVAL, parts.slo_metrics.current)

        async def prune() -> None:
            if not parts.membership.is_leader:
                return  # retention is the leader's job: one prune, not one per replica
            storage = parts.config.storage
            retention = storage.retention.total_seconds()
            with contextlib.suppress(StoreUnavailable):  # the next hour's prune catches up
                await results.prune(clock(), retention)
                await slos.prune(clock(), retention)
                await parts.trail.prune(storage.audit_retention.total_seconds())

        scheduler.every("results.prune", PRUNE_INTERVAL, prune, first_in=60)
        # Maintenance windows open and close on the clock, not on probe results.
        scheduler.every("health.reevaluate", 1.0, parts.book.reevaluate)
        try:
            yield
        finally:
            await sharding.aclose()
            await checker.close()
            scheduler.shutdown()
            await parts.slo_metrics.close()
            slos.evaluate(clock())  # closes the finished minutes, so they are stored too
            try:
                await results.flush(clock(), everything=True)
                await slos.flush()
            except StoreUnavailable:
                log.error("storage failing at shutdown: the last probe results were not stored")
            await parts.prober.close()
            await parts.bus.close()

    return run


def _workflows(parts: Parts) -> Context:
    """Resume unfinished processes after the registry and probes are up; stop them first.
    The engine runs while this replica leads (always, on SQLite): see _follow_leadership."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        engine, storage, clock = parts.engine, parts.config.storage, parts.catalog.now
        await parts.caller.start()
        if parts.leadership.is_leader:  # the daemon answers once its processes resumed
            await engine.open()
        else:  # a follower's SLOs read the processes the leader writes
            await parts.processes.create_tables()
        await parts.workflow_slos.load(parts.processes.outcomes, clock())
        retention = storage.process_retention.total_seconds()
        events = storage.event_retention.total_seconds()

        async def prune() -> None:
            if parts.membership.is_leader:  # the leader's job, as results.prune
                await engine.prune(retention, events)

        parts.scheduler.every("workflows.prune", PRUNE_INTERVAL, prune, first_in=60)
        relay = _relay(parts)
        if relay is not None:
            await relay.start()
        follower = asyncio.create_task(
            _follow_leadership(engine, parts.leadership, relay), name="workflows-leadership"
        )
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            if relay is not None:
                await relay.stop()
            await engine.close()
            await parts.caller.close()

    return run


def _relay(parts: Parts) -> EventRelay | None:
    """On PostgreSQL, the events published on other replicas reach this one's bus."""
    url = parts.config.storage.url
    if url is None:
        return None
    from .relay import EventRelay

    engine = parts.engine
    return EventRelay(
        parts.bus,
        url,
        read_after=engine.store.events_after,
        last_seq=engine.store.last_event_seq,
        engine_here=lambda: engine.serving,
        metrics=parts.metrics,
    )


async def _follow_leadership(
    engine: Engine, leadership: Leadership, relay: EventRelay | None = None
) -> None:
    """Open the engine when this replica wins leadership, close it as soon as it loses it
    (its processes may run elsewhere from the moment the lease passes). An open that
    fails (storage refused) is tried again while the replica still leads. Before an open
    the relay hands the bus the events stored meanwhile: ids go on from the last."""
    changed = asyncio.Event()
    leadership.on_leadership(changed.set)
    pause = OPEN_RETRY_MIN
    while True:
        changed.clear()
        if not leadership.is_leader and engine.serving:
            log.info("leadership lost: the workflow engine stops here")
            await engine.close()
        elif engine.serving and not engine.owner_current:
            # Rejoined under a new member key while leading (a database restart): the
            # processes move to the new key, or a sweep of dead keys would take them.
            await engine.close()
            changed.set()
        elif leadership.is_leader and not engine.serving:
            try:
                if relay is not None:
                    await relay.catch_up()
                await engine.open()
                log.info("leadership won: the workflow engine runs here")
                pause = OPEN_RETRY_MIN
            except Exception as exc:  # storage refused (or worse): retried, never given up
                log.warning("the workflow engine could not open: %s; trying again", exc)
                await engine.close()  # what the half-done open started
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await changed.wait()
                pause = min(pause * 2, OPEN_RETRY_MAX)
                continue
        await changed.wait()


def _listeners(parts: Parts) -> Context:
    """Notifications and the status page's change log: they listen to the bus, so they stop
    first; the notifier re-arms its stored deliveries."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        await parts.notifier.start()
        adoptions = _adopting(parts)
        await parts.page.start()
        try:
            yield
        finally:
            for adoption in adoptions:
                adoption.cancel()
            await parts.page.close()
            await parts.notifier.close()

    return run


def _adopting(parts: Parts) -> set[asyncio.Task[None]]:
    """On PostgreSQL, the deliveries of members no longer live (dead, or of an earlier life
    of the cluster) are adopted now and at every membership change, and sent from here
    under their own delivery ids. The tasks under way, for the stage to cancel."""
    running: set[asyncio.Task[None]] = set()
    if parts.config.storage.url is None:
        return running
    notifier, membership = parts.notifier, parts.membership

    async def adopt() -> None:
        try:
            await notifier.adopt_orphans(membership.keys)
        except StoreUnavailable:
            log.warning("notifications: adoption deferred: storage unavailable")

    def spawn(_: object = None) -> None:
        task = asyncio.create_task(adopt(), name="notifications-adopt")
        running.add(task)
        task.add_done_callback(running.discard)

    spawn()
    membership.on_change(spawn)
    return running


def _reloader(reloader: Reloader, *, signals: bool) -> Context:
    async def run(app: web.Application) -> AsyncIterator[None]:
        reloader.start(signals=signals)
        try:
            yield
        finally:
            await reloader.close()

    return run


async def _keep_heap_frozen(app: web.Application) -> AsyncIterator[None]:
    """Move survivors out of the cyclic GC's reach every second, and collect the young
    less often (YOUNG_THRESHOLD).

    The registry keeps tens of thousands of long-lived, acyclic objects (they are
    freed by reference counting, not by the cycle collector). Left in generation
    2, each full collection walks all of them: 140 ms pauses were measured at 50k
    instances, the whole p99 of a registration. Frozen objects are still freed
    when their last reference goes; only cycles among them would leak, and the
    registry makes none.
    """

    async def freeze() -> None:
        while True:
            gc.freeze()
            await asyncio.sleep(FREEZE_INTERVAL)

    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    app[HEAP] = asyncio.create_task(freeze(), name="gc-freeze")
    yield
    app[HEAP].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[HEAP]
    gc.set_threshold(*thresholds)
