"""The composition root: builds every part from a Config and wires them into the app.

It only wires: parts.py holds what it built, lifecycle.py starts and stops it,
reload.py applies a new config, convert.py maps config entries to domain values.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from monitor.audit.trail import AuditTrail
from monitor.cluster.leadership import Leadership
from monitor.cluster.membership import Membership
from monitor.cluster.metrics import ClusterCollector
from monitor.health import ProbeResults
from monitor.health.book import HealthBook
from monitor.health.checker import HealthChecker
from monitor.health.maintenance import MaintenanceCalendar
from monitor.health.metrics import ProbeMetrics
from monitor.http.audit import TRAIL, refused
from monitor.http.auth import Authorizer
from monitor.http.errors import REFUSED, error_middleware
from monitor.http.forward import Forwarder
from monitor.http.limits import MAX_BODY_BYTES, READ_TIMEOUT
from monitor.http.routes.audit import AuditRoutes
from monitor.http.routes.cluster import ClusterRoutes
from monitor.http.routes.health import HealthRoutes
from monitor.http.routes.login import LoginRoutes
from monitor.http.routes.operations import OperationsRoutes, daemon_document
from monitor.http.routes.page import PageRoutes
from monitor.http.routes.registry import LeaseDefaults, RegistryRoutes
from monitor.http.routes.slos import SloRoutes
from monitor.http.routes.tasks import TaskRoutes
from monitor.http.routes.workflows import WorkflowRoutes
from monitor.http.shedding import LoadShedder
from monitor.metrics.runtime import register_runtime_collectors
from monitor.notify import Notifier
from monitor.page.status_page import StatusPage
from monitor.probing.prober import Prober
from monitor.slo import SloBook, SloMetrics, WorkflowSlos
from registry import (
    Catalog,
    Clock,
    HealthState,
    SystemClock,
)
from registry.catalog import LEASE_SLACK
from registry.metrics import RegistryCollector
from scheduler import EventBus, Scheduler
from workflows.caller import ServiceCaller
from workflows.engine import Engine
from workflows.metrics import (
    CallMetrics,
    ProcessCollector,
    ResourceCollector,
    TaskCollector,
    WorkflowMetrics,
    task_queues,
)

from . import lifecycle
from .config import Config
from .convert import (
    bus_topic_label,
    definition_from_json,
    definitions_from_config,
    dependencies,
    protect_reads,
    resources_from_config,
    service_probes,
    tokens,
)
from .keys import (
    BUS,
    CONFIG,
    DATABASE,
    ENGINE,
    PARTS,
    REAPER,
    RESULTS,
    SHEDDER,
)
from .parts import LiveConfig, Parts
from .reload import Reloader, apply_config, probe_latency_buckets
from .stores import build_stores

log = logging.getLogger(__name__)


def build_app(
    config: Config,
    *,
    clock: Clock | None = None,
    metrics: CollectorRegistry | None = None,
    config_path: Path | None = None,
    watch_interval: float | None = None,
    reload_on_sighup: bool = False,
    leadership: Leadership | None = None,
) -> web.Application:
    """`config_path` turns on hot reload: a file watch, and SIGHUP with `reload_on_sighup`.
    `leadership` says whether this replica runs the workflow engine (None: always, as on
    SQLite); given, or with `storage.url`, followers forward workflow requests to it."""
    auth = Authorizer(tokens(config), protect_reads=protect_reads(config))
    registry = metrics or CollectorRegistry(auto_describe=True)
    shedder = LoadShedder(config.server.overload_lag.total_seconds(), registry)
    # Each middleware costs every request a frame: only those that are on are installed.
    # The shedder comes first: refusing must cost as little as possible.
    middlewares = [shedder.middleware()] if shedder.enabled else []
    parts = _build(config, clock or SystemClock(), registry, auth, shedder)
    if leadership is None and config.storage.url is not None:
        leadership = parts.membership  # replicas: the leader lease says who runs workflows
    if leadership is not None:
        parts.leadership = leadership
        parts.engine.acting = lambda: leadership.is_leader
    forwarder = _forwarder(
        leadership, parts.membership.replica_id, lambda request: _starts_by_route(parts, request)
    )
    if forwarder is not None:  # before auth: the leader authorizes what it is sent
        middlewares.append(forwarder.middleware())
    middlewares.append(error_middleware)
    if auth.enabled:
        middlewares.append(auth.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[READ_TIMEOUT] = config.server.read_timeout.total_seconds()
    app[TRAIL] = parts.trail
    app[REFUSED] = refused
    app.cleanup_ctx.append(shedder.context)
    if forwarder is not None:
        app.cleanup_ctx.append(forwarder.context)
    _keep(app, parts)
    app.add_routes(PageRoutes(parts.page, parts.auth).routes())
    app.add_routes(LoginRoutes(parts.auth, parts.page).routes())
    app.add_routes(parts.registry_routes.routes())
    app.add_routes(HealthRoutes(parts.book).routes())
    app.add_routes(parts.slo_routes.routes())
    app.add_routes(parts.workflow_routes.routes())
    app.add_routes(TaskRoutes(parts.engine.tasks, parts.catalog, parts.auth).routes())
    app.add_routes(ClusterRoutes(parts.membership).routes())
    app.add_routes(AuditRoutes(parts.trail, parts.auth).routes())
    app.on_shutdown.append(parts.workflow_routes.close_streams)
    operations = OperationsRoutes(
        database=parts.database,
        scheduler=parts.scheduler,
        registry_running=lambda: REAPER in app and not app[REAPER].done(),
        catalog=parts.catalog,
        probe_metrics=parts.probe_metrics,
        metrics=parts.metrics,
        slo_metrics=parts.slo_metrics,
        document=lambda: openapi_document(parts.live.current),
        leads=lambda: parts.membership.is_leader,
    )
    app.add_routes(operations.routes())
    app.add_routes([parts.workflow_routes.router()])  # last: only paths nothing else has
    reloader = None
    if config_path is not None:
        reloader = Reloader(
            config_path,
            parts.live,
            lambda old, new: apply_config(parts, old, new),
            metrics=registry,
            audit=lambda by, applied: parts.trail.reloaded(by, applied, str(config_path)),
            **({"watch_interval": watch_interval} if watch_interval else {}),
        )
    app.cleanup_ctx.extend(lifecycle.contexts(parts, reloader, signals=reload_on_sighup))
    if not auth.enabled and not config.server.is_loopback:
        log.warning(
            "no auth tokens configured and listening on %s: anyone who can reach it may "
            "register, deregister and publish (set server.auth.tokens)",
            config.server.listen,
        )
    return app


def _build(
    config: Config,
    clock: Clock,
    registry: CollectorRegistry,
    auth: Authorizer,
    shedder: LoadShedder,
) -> Parts:
    """Every part, each given the parts it uses."""
    live = LiveConfig(config)
    stores = build_stores(config.storage)
    database = stores.database
    # The replicas sharing the database (DESIGN §8): on SQLite, this daemon alone, leading.
    membership = Membership(
        stores.members,
        replica_id=config.cluster.replica_id,
        lease=config.cluster.lease.total_seconds(),
        address=advertised_address(config.server.listen),
        connection=stores.members_database,
    )
    registry.register(ClusterCollector(membership))
    bus = EventBus(clock=clock.time)
    scheduler = Scheduler(registry)
    calendar = MaintenanceCalendar(config.maintenance)
    book = HealthBook(
        bus=bus, calendar=calendar, dependencies=dependencies(config), clock=clock.time
    )
    catalog = Catalog(
        stores.registry,
        reaping=lambda: membership.is_leader,
        # A lease lapses at exactly ttl while this replica is alone; with others, a
        # heartbeat sent to one of them reaches this one up to LEASE_SLACK later.
        lease_slack=lambda: LEASE_SLACK if len(membership.members) > 1 else 0.0,
        clock=clock,
        health=book,
    )
    shedder.on_change(
        lambda shedding: catalog.pause_expiry() if shedding else catalog.resume_expiry()
    )
    book.on_change(catalog.touch)  # a health change wakes blocking queries
    results = ProbeResults(stores.results, probe_latency_buckets(config))
    slos = SloBook(
        config.services,
        bus=bus,
        store=stores.slo_minutes,
        publishes=lambda: membership.is_leader,
    )
    budget = config.server.probe_budget
    prober = Prober(concurrency=budget.in_flight, workers=budget.workers)
    checker = HealthChecker(
        catalog=catalog,
        book=book,
        prober=prober,
        store=results,
        scheduler=scheduler,
        defaults=config.defaults.probe,
        service_probes=service_probes(config),
        slos=slos,
        budget=budget.per_second,
        states=stores.health_states,
    )
    registry.register(RegistryCollector(catalog))
    register_runtime_collectors(registry)
    Gauge(
        "hms_storage_writable",
        "1 while the database accepts writes; 0 from a failed commit (disk full, read-only) "
        "until the next good one",
        registry=registry,
    ).set_function(lambda: float(database.writable))

    registry_routes = RegistryRoutes(
        catalog,
        auth,
        LeaseDefaults(
            ttl=config.defaults.lease.ttl, deregister_after=config.defaults.lease.deregister_after
        ),
        checker.probe_for,
        config.server.targets,
    )

    def candidates(service: str) -> list[tuple[str, str]]:
        """Instances a workflow step may call: not critical, not suppressed, and allowed
        by the targets policy registrations are held to (a reload narrows both at once)."""
        targets = registry_routes.targets
        return [
            (status.instance.id, status.instance.url)
            for status in catalog.instances(service)
            if status.instance.url  # a worker registers without one: it is not called
            and status.health is not HealthState.CRITICAL
            and not book.suppressed((service, status.instance.id))
            and targets.allows_url(status.instance.url)
        ]

    definitions = definitions_from_config(config)
    workflow_slos = WorkflowSlos({d.name: d.objective for d in definitions})
    processes = stores.workflows
    call_metrics = CallMetrics(registry, probe_latency_buckets(config))
    for service in {s for d in definitions for s in d.services()}:
        call_metrics.declare(service)

    def observe_call(service: str, served: bool, seconds: float) -> None:
        """A workflow call, for `hms_service_calls_*` and `source: calls` SLOs. Calls inside
        the service's maintenance window count in neither, as its probes do not."""
        if book.in_maintenance(service):
            return
        call_metrics.observe(service, served, seconds)
        slos.record_call(service, catalog.now(), served=served, seconds=seconds)

    caller = ServiceCaller(candidates, observe_call)
    engine = Engine(
        definitions,
        store=processes,
        caller=caller,
        bus=bus,
        metrics=WorkflowMetrics(registry),
        clock=clock.time,
        outcome=workflow_slos.record,
        tasks=stores.tasks,
        parse=definition_from_json,  # API-deployed and older versions, rebuilt at open
        declare=lambda d: workflow_slos.declare(d.name, d.objective),  # API ones get SLOs too
        resources=resources_from_config(config),
        resource_store=stores.resources,
        schedules=stores.schedules,
        # Replicas: processes are written under the leader's member key (fenced checkpoints).
        owner=(lambda: membership.key) if config.storage.url is not None else (lambda: None),
    )
    registry.register(
        ProcessCollector(lambda: engine.counts, lambda: bus.published, lambda: len(engine.live))
    )
    if engine.tasks is not None:
        queues = engine.tasks
        registry.register(
            TaskCollector(
                lambda: task_queues(engine.definitions.values()),
                queues.depths,
                queues.workers,
            )
        )
    if engine.resources is not None:
        pool = engine.resources
        registry.register(
            ResourceCollector(lambda: pool.capacities, lambda: pool.in_use, lambda: pool.waiting)
        )
    bus.label = bus_topic_label(definitions, config)
    notifier = Notifier(
        config.notifications,
        outbox=stores.outbox,
        # Replicas: deliveries are kept under the member key that sends them (on SQLite ""
        # always, so a restarted daemon finds its own).
        owner=(lambda: membership.key) if config.storage.url is not None else (lambda: ""),
        bus=bus,
        metrics=registry,
        in_maintenance=book.in_maintenance,
        clock=clock.time,
    )
    trail = AuditTrail(stores.audit, bus, clock.time)
    page = StatusPage(
        catalog=catalog,
        book=book,
        slos=slos,
        uptime=results.uptime,
        engine=engine,
        bus=bus,
        config=lambda: live.current,
        clock=clock.time,
        audit=trail.list,
        membership=membership,
    )
    return Parts(
        trail=trail,
        config=config,
        live=live,
        metrics=registry,
        database=database,
        membership=membership,
        catalog=catalog,
        bus=bus,
        scheduler=scheduler,
        auth=auth,
        shedder=shedder,
        calendar=calendar,
        book=book,
        prober=prober,
        checker=checker,
        results=results,
        slos=slos,
        slo_metrics=SloMetrics(slos, clock.time),
        probe_metrics=ProbeMetrics(
            checker, lambda: calendar.services, replica=membership.replica_id
        ),
        processes=processes,
        caller=caller,
        engine=engine,
        workflow_slos=workflow_slos,
        notifier=notifier,
        page=page,
        registry_routes=registry_routes,
        slo_routes=SloRoutes(slos, {s.name for s in config.services}, clock.time, workflow_slos),
        workflow_routes=WorkflowRoutes(engine, bus, auth, config.server.sse_buffer),
    )


def advertised_address(listen: str) -> str:
    """The base URL other replicas reach this one at: `server.listen`, its host replaced by
    this host's address when it listens on every interface (a pod's IP in Kubernetes)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostbyname(socket.gethostname())
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _forwarder(
    leadership: Leadership | None, replica: str, is_route: Callable[[web.Request], bool]
) -> Forwarder | None:
    """Forwarding of workflow requests to the leader: only where replicas share PostgreSQL
    (their membership is the leadership) or a test names one; one daemon on SQLite always
    runs its engine, and no request of its pays for a forwarding check."""
    if leadership is None:
        return None
    return Forwarder(leadership, replica, is_route)


def _starts_by_route(parts: Parts, request: web.Request) -> bool:
    """The request fell through to the workflows' `route:` router (no other route has it)."""
    handler: object = request.match_info.handler
    return handler == parts.workflow_routes.route


def _keep(app: web.Application, parts: Parts) -> None:
    """All the parts under PARTS, and the few that tests look up by their own key."""
    app[PARTS], app[CONFIG], app[DATABASE], app[BUS] = (
        parts,
        parts.config,
        parts.database,
        parts.bus,
    )
    app[RESULTS], app[SHEDDER], app[ENGINE] = parts.results, parts.shedder, parts.engine


def openapi_document(config: Config | None = None) -> dict[str, Any]:
    """/openapi.json for `config`: each workflow's `route:` is documented too."""
    workflow_routes = {w.route: w.name for w in config.workflows if w.route} if config else None
    return daemon_document(workflow_routes)
