"""The composition root: builds the aiohttp application from a Config."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from monitor.convert import definition_from_config
from monitor.health.book import HealthBook
from monitor.health.checker import HealthChecker
from monitor.health.maintenance import MaintenanceCalendar
from monitor.health.metrics import ProbeMetrics
from monitor.health.results import ResultStore
from monitor.http.auth import Authorizer
from monitor.http.errors import error_middleware
from monitor.http.limits import MAX_BODY_BYTES, READ_TIMEOUT
from monitor.http.routes.health import HealthRoutes
from monitor.http.routes.login import LoginRoutes
from monitor.http.routes.operations import OperationsRoutes, daemon_document
from monitor.http.routes.page import PageRoutes
from monitor.http.routes.registry import LeaseDefaults, RegistryRoutes
from monitor.http.routes.slos import SloRoutes
from monitor.http.routes.workflows import WorkflowRoutes
from monitor.http.shedding import LoadShedder
from monitor.metrics.runtime import register_runtime_collectors
from monitor.notify.notifier import Notifier
from monitor.page.status_page import StatusPage
from monitor.probing.prober import Prober
from monitor.slo.book import SloBook, SloMetrics, WorkflowSlos
from monitor.storage.database import Database
from registry import (
    Catalog,
    Clock,
    HealthState,
    Instance,
    ProbeSpec,
    SqliteRegistryStore,
    StoreUnavailable,
    SystemClock,
)
from registry.metrics import RegistryCollector
from scheduler import EventBus, Scheduler
from workflows import Definition
from workflows.caller import ServiceCaller
from workflows.engine import Engine
from workflows.metrics import ProcessCollector, WorkflowMetrics, topic_label
from workflows.stores.sqlite import ProcessStore

from .config import Config
from .keys import (
    AUTHORIZER,
    BUS,
    CALENDAR,
    CATALOG,
    CHECKER,
    CONFIG,
    DATABASE,
    ENGINE,
    HEAP,
    LIVE_CONFIG,
    METRICS,
    NOTIFIER,
    PAGE,
    PROBE_METRICS,
    REAPER,
    REGISTRY_ROUTES,
    RELOADER,
    RESULTS,
    SCHEDULER,
    SHEDDER,
    SLO_METRICS,
    SLO_ROUTES,
    SLOS,
    WORKFLOW_ROUTES,
    WORKFLOW_SLOS,
)
from .reload import LiveConfig, Reloader, probe_latency_buckets

log = logging.getLogger(__name__)

SLO_INTERVAL = 30.0
SLO_METRICS_INTERVAL = 5.0
FLUSH_INTERVAL = 1.0
PRUNE_INTERVAL = 3600.0
FREEZE_INTERVAL = 1.0


def build_app(
    config: Config,
    *,
    clock: Clock | None = None,
    metrics: CollectorRegistry | None = None,
    config_path: Path | None = None,
    watch_interval: float | None = None,
    reload_on_sighup: bool = False,
) -> web.Application:
    """`config_path` turns on hot reload: a file watch, and SIGHUP with `reload_on_sighup`."""
    auth = Authorizer(_tokens(config), protect_reads=_protect_reads(config))
    registry = metrics or CollectorRegistry(auto_describe=True)
    shedder = LoadShedder(config.server.overload_lag.total_seconds(), registry)
    # Each middleware costs every request a frame: only those that are on are installed.
    # The shedder comes first: refusing must cost as little as possible.
    middlewares = [shedder.middleware()] if shedder.enabled else []
    middlewares.append(error_middleware)
    if auth.enabled:
        middlewares.append(auth.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[READ_TIMEOUT] = config.server.read_timeout.total_seconds()
    app[SHEDDER] = shedder
    app[AUTHORIZER] = auth
    app.cleanup_ctx.append(shedder.context)
    clock = clock or SystemClock()
    database = Database(config.storage.path)
    bus = EventBus(clock=clock.time)
    scheduler = Scheduler(registry)
    calendar = MaintenanceCalendar(config.maintenance)
    book = HealthBook(
        bus=bus,
        calendar=calendar,
        dependencies=dependencies(config),
        clock=clock.time,
    )
    catalog = Catalog(SqliteRegistryStore(database), clock=clock, health=book)
    shedder.on_change(
        lambda shedding: catalog.pause_expiry() if shedding else catalog.resume_expiry()
    )
    book.on_change(catalog.touch)  # a health change wakes blocking queries
    results = ResultStore(database, probe_latency_buckets(config))
    slos = SloBook(config.services, bus=bus)
    checker = HealthChecker(
        catalog=catalog,
        book=book,
        prober=Prober(
            concurrency=config.server.probe_budget.in_flight,
            workers=config.server.probe_budget.workers,
        ),
        store=results,
        scheduler=scheduler,
        defaults=config.defaults.probe,
        service_probes=service_probes(config),
        slos=slos,
        budget=config.server.probe_budget.per_second,
    )
    app[SLOS] = slos
    app[SLO_METRICS] = SloMetrics(slos, clock.time)
    app[CONFIG], app[DATABASE], app[CATALOG], app[METRICS] = config, database, catalog, registry
    app[BUS], app[SCHEDULER], app[CHECKER], app[RESULTS] = bus, scheduler, checker, results
    registry.register(RegistryCollector(catalog))
    register_runtime_collectors(registry)
    Gauge(
        "hms_storage_writable",
        "1 while the database accepts writes; 0 from a failed commit (disk full, read-only) "
        "until the next good one",
        registry=registry,
    ).set_function(lambda: float(database.writable))
    app[PROBE_METRICS] = ProbeMetrics(checker, lambda: calendar.services)
    app[CALENDAR] = calendar
    engine = _workflow_engine(app, config, registry, book, clock)
    app[NOTIFIER] = Notifier(
        config.notifications,
        db=database,
        bus=bus,
        metrics=registry,
        in_maintenance=book.in_maintenance,
        clock=clock.time,
    )

    live = app[LIVE_CONFIG] = LiveConfig(config)
    app[PAGE] = StatusPage(
        catalog=catalog,
        book=book,
        slos=slos,
        uptime=results.uptime,
        engine=engine,
        bus=bus,
        config=lambda: live.current,
        clock=clock.time,
    )
    app.add_routes(PageRoutes(app[PAGE]).routes())
    app.add_routes(LoginRoutes(auth, app[PAGE]).routes())
    leases = LeaseDefaults(
        ttl=config.defaults.lease.ttl, deregister_after=config.defaults.lease.deregister_after
    )
    registry_routes = app[REGISTRY_ROUTES] = RegistryRoutes(
        catalog, auth, leases, checker.probe_for, config.server.targets
    )
    app.add_routes(registry_routes.routes())
    app.add_routes(HealthRoutes(book).routes())
    slo_routes = app[SLO_ROUTES] = SloRoutes(
        slos, {s.name for s in config.services}, clock.time, app[WORKFLOW_SLOS]
    )
    app.add_routes(slo_routes.routes())
    workflow_routes = app[WORKFLOW_ROUTES] = WorkflowRoutes(
        engine, bus, auth, config.server.sse_buffer
    )
    app.add_routes(workflow_routes.routes())
    app.on_shutdown.append(workflow_routes.close_streams)
    operations = OperationsRoutes(
        database=database,
        scheduler=scheduler,
        registry_running=lambda: REAPER in app and not app[REAPER].done(),
        catalog=catalog,
        probe_metrics=app[PROBE_METRICS],
        metrics=registry,
        slo_metrics=app[SLO_METRICS],
        document=lambda: openapi_document(live.current),
    )
    app.add_routes(operations.routes())
    app.add_routes([workflow_routes.router()])  # last: it sees only paths nothing else has
    app.cleanup_ctx.append(_run_registry)
    app.cleanup_ctx.append(_run_monitor)
    app.cleanup_ctx.append(_run_workflows)
    app.cleanup_ctx.append(_run_listeners)
    if config_path is not None:
        app[RELOADER] = Reloader(
            config_path,
            live,
            lambda old, new: apply_config(app, old, new),
            metrics=registry,
            **({"watch_interval": watch_interval} if watch_interval else {}),
        )
        app.cleanup_ctx.append(_run_reloader(reload_on_sighup))
    app.cleanup_ctx.append(_keep_heap_frozen)
    if not auth.enabled and not config.server.is_loopback:
        log.warning(
            "no auth tokens configured and listening on %s: anyone who can reach it may "
            "register, deregister and publish (set server.auth.tokens)",
            config.server.listen,
        )
    return app


def _workflow_engine(
    app: web.Application,
    config: Config,
    registry: CollectorRegistry,
    book: HealthBook,
    clock: Clock,
) -> Engine:
    """Definitions from the config; steps call instances the registry and health book allow."""
    catalog = app[CATALOG]
    definitions = [definition_from_config(workflow) for workflow in config.workflows]

    def candidates(service: str) -> list[tuple[str, str]]:
        targets = app[REGISTRY_ROUTES].targets  # the live policy: a reload may narrow it
        return [
            (status.instance.id, status.instance.url)
            for status in catalog.instances(service)
            if status.health is not HealthState.CRITICAL
            and not book.suppressed((service, status.instance.id))
            and targets.allows_url(status.instance.url)
        ]

    metrics = WorkflowMetrics(registry)
    slos = WorkflowSlos({d.name: d.objective for d in definitions})
    engine = Engine(
        definitions,
        store=ProcessStore(app[DATABASE]),
        caller=ServiceCaller(candidates),
        bus=app[BUS],
        metrics=metrics,
        clock=clock.time,
        outcome=slos.record,
    )
    registry.register(ProcessCollector(lambda: engine.counts, lambda: app[BUS].published))
    app[BUS].label = _topic_label(definitions, config)
    app[ENGINE], app[WORKFLOW_SLOS] = engine, slos
    return engine


async def _run_workflows(app: web.Application) -> AsyncIterator[None]:
    """Resume unfinished processes after the registry and probes are up; stop them first."""
    engine, config = app[ENGINE], app[CONFIG]
    clock = app[CATALOG].now
    await engine.caller.start()
    await engine.open()
    await app[WORKFLOW_SLOS].load(engine.store.outcomes, clock())
    retention = config.storage.process_retention.total_seconds()
    events = config.storage.event_retention.total_seconds()
    app[SCHEDULER].every(
        "workflows.prune", PRUNE_INTERVAL, lambda: engine.prune(retention, events), first_in=60
    )
    try:
        yield
    finally:
        await engine.close()
        await engine.caller.close()


async def _run_listeners(app: web.Application) -> AsyncIterator[None]:
    """Notifications and the status page's change log: they listen to the bus, so they stop
    first; the notifier re-arms its stored deliveries."""
    notifier, page = app[NOTIFIER], app[PAGE]
    await notifier.start()
    await page.start()
    try:
        yield
    finally:
        await page.close()
        await notifier.close()


def _run_reloader(signals: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        app[RELOADER].start(signals=signals)
        try:
            yield
        finally:
            await app[RELOADER].close()

    return run


async def apply_config(app: web.Application, old: Config, new: Config) -> None:
    """Apply a validated config to the running parts (monitor/reload.py has the rules)."""
    clock = app[CATALOG].now()
    app[CALENDAR].replace(new.maintenance)
    app[CHECKER].book.configure(dependencies(new))
    app[CHECKER].configure(new.defaults.probe, service_probes(new))
    app[CATALOG].replace_static(static_instances(new), (s.name for s in new.services))
    app[REGISTRY_ROUTES].targets = new.server.targets
    app[AUTHORIZER].replace(_tokens(new), protect_reads=_protect_reads(new))
    if new.server.auth != old.server.auth:  # open streams keep the grant they opened with
        app[WORKFLOW_ROUTES].end_streams()
    app[WORKFLOW_ROUTES].sse_buffer = new.server.sse_buffer
    app[SHEDDER].max_lag = new.server.overload_lag.total_seconds()
    await app[SLOS].configure(new.services, app[DATABASE], clock)
    app[SLO_ROUTES].services = {s.name for s in new.services}
    definitions = [definition_from_config(workflow) for workflow in new.workflows]
    app[ENGINE].configure(definitions)
    await app[WORKFLOW_SLOS].configure(
        {d.name: d.objective for d in definitions}, app[ENGINE].store.outcomes, clock
    )
    await app[NOTIFIER].configure(new.notifications)
    app[BUS].label = _topic_label(definitions, new)
    app[SLO_METRICS].invalidate()


def _topic_label(definitions: list[Definition], config: Config) -> Callable[[str], str]:
    return topic_label(definitions, (e for n in config.notifications for e in n.events))


def _tokens(config: Config) -> list[tuple[str, tuple[str, ...]]]:
    auth = config.server.auth
    return [] if auth is None else [(t.token.get_secret_value(), t.scopes) for t in auth.tokens]


def _protect_reads(config: Config) -> bool:
    return config.server.auth is not None and config.server.auth.protect_reads


def dependencies(config: Config) -> dict[str, tuple[str, ...]]:
    return {s.name: tuple(s.depends_on) for s in config.services}


def service_probes(config: Config) -> dict[str, ProbeSpec]:
    return {s.name: s.probe for s in config.services if s.probe is not None}


def static_instances(config: Config) -> list[Instance]:
    return [
        Instance(
            service=service.name,
            id=instance.id,
            url=instance.url,
            tags=service.tags,
            meta={**service.meta, **instance.meta},
            probe=service.probe,
            static=True,
        )
        for service in config.services
        for instance in service.instances
    ]


async def _run_registry(app: web.Application) -> AsyncIterator[None]:
    config, database, catalog = app[CONFIG], app[DATABASE], app[CATALOG]
    await database.open()
    try:
        restored = await catalog.load(
            static_instances(config), declared=(s.name for s in config.services)
        )
        log.info("registry restored %d registered instance(s)", restored)
        app[REAPER] = asyncio.create_task(catalog.run_reaper(), name="registry-reaper")
        yield
        app[REAPER].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app[REAPER]
    finally:
        await database.close()


async def _run_monitor(app: web.Application) -> AsyncIterator[None]:
    """Scheduler, probes, result flushing; started after the registry, stopped before it."""
    config, scheduler, checker, results = app[CONFIG], app[SCHEDULER], app[CHECKER], app[RESULTS]
    clock = app[CATALOG].now
    await results.create_tables(clock())
    slos, database = app[SLOS], app[DATABASE]
    await slos.load(database, clock())
    await checker.prober.start()
    scheduler.start()
    checker.start()

    async def flush() -> None:
        # While storage fails (Database logs it once) both keep their rows for the next go.
        with contextlib.suppress(StoreUnavailable):
            await results.flush(clock())
            await slos.flush(database)

    scheduler.every("results.flush", FLUSH_INTERVAL, flush)
    scheduler.every("slo.evaluate", SLO_INTERVAL, lambda: slos.evaluate(clock()))
    # Renders the SLO metrics early in each minute, so scrapes find the text ready.
    scheduler.every("slo.metrics", SLO_METRICS_INTERVAL, app[SLO_METRICS].current)

    async def prune() -> None:
        retention = config.storage.retention.total_seconds()
        with contextlib.suppress(StoreUnavailable):  # the next hour's prune catches up
            await results.prune(clock(), retention)
            await slos.prune(database, clock(), retention)

    scheduler.every("results.prune", PRUNE_INTERVAL, prune, first_in=60)
    # Maintenance windows open and close on the clock, not on probe results.
    scheduler.every("health.reevaluate", 1.0, checker.book.reevaluate)
    try:
        yield
    finally:
        await checker.close()
        scheduler.shutdown()
        slos.evaluate(clock())  # closes the finished minutes, so they are stored too
        try:
            await results.flush(clock(), everything=True)
            await slos.flush(database)
        except StoreUnavailable:
            log.error("storage failing at shutdown: the last probe results were not stored")
        await checker.prober.close()
        await app[BUS].close()


async def _keep_heap_frozen(app: web.Application) -> AsyncIterator[None]:
    """Move survivors out of the cyclic GC's reach every second.

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

    app[HEAP] = asyncio.create_task(freeze(), name="gc-freeze")
    yield
    app[HEAP].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[HEAP]


def openapi_document(config: Config | None = None) -> dict[str, Any]:
    """/openapi.json for `config`: each workflow's `route:` is documented too."""
    workflow_routes = {w.route: w.name for w in config.workflows if w.route} if config else None
    return daemon_document(workflow_routes)
