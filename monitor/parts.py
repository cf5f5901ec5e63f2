"""Everything the composition root builds, kept in one place.

app.py builds the parts and wires them; lifecycle.py starts and stops them in
order; reload.py applies a new config to them. Each uses the parts themselves,
never one part reached through another (`engine.caller`, `checker.prober`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from monitor.audit.trail import AuditTrail
from monitor.cluster.leadership import AlwaysLeader, Leadership
from monitor.cluster.membership import Membership
from monitor.health.book import HealthBook
from monitor.health.checker import HealthChecker
from monitor.health.maintenance import MaintenanceCalendar
from monitor.health.metrics import ProbeMetrics
from monitor.health.results import ProbeResults
from monitor.http.auth import Authorizer
from monitor.http.routes.registry import RegistryRoutes
from monitor.http.routes.slos import SloRoutes
from monitor.http.routes.workflows import WorkflowRoutes
from monitor.http.shedding import LoadShedder
from monitor.notify.notifier import Notifier
from monitor.page.status_page import StatusPage
from monitor.probing.prober import Prober
from monitor.slo import SloBook, SloMetrics, WorkflowSlos
from monitor.storage.database import Database
from registry import Catalog
from scheduler import EventBus, Scheduler
from workflows.abc import WorkflowStore
from workflows.caller import ServiceCaller
from workflows.engine import Engine

from .config import Config

if TYPE_CHECKING:  # psycopg (22 MB) is imported only when storage.url is set
    from monitor.storage.postgres import PgDatabase


class LiveConfig:
    """The config in force. Readers call `current` each time; a reload swaps it whole."""

    def __init__(self, config: Config) -> None:
        self.current = config


@dataclass(kw_only=True, slots=True)
class Parts:
    config: Config  # as loaded at start; `live.current` is the one in force
    live: LiveConfig
    metrics: CollectorRegistry
    database: Database | PgDatabase
    membership: Membership
    catalog: Catalog
    bus: EventBus
    scheduler: Scheduler
    auth: Authorizer
    shedder: LoadShedder
    calendar: MaintenanceCalendar
    book: HealthBook
    prober: Prober
    checker: HealthChecker
    results: ProbeResults
    slos: SloBook
    slo_metrics: SloMetrics
    probe_metrics: ProbeMetrics
    processes: WorkflowStore
    caller: ServiceCaller
    engine: Engine
    workflow_slos: WorkflowSlos
    notifier: Notifier
    page: StatusPage
    registry_routes: RegistryRoutes
    slo_routes: SloRoutes
    workflow_routes: WorkflowRoutes
    trail: AuditTrail
    # Who runs the workflow engine (monitor/cluster/leadership.py); on SQLite, this daemon.
    leadership: Leadership = field(default_factory=AlwaysLeader)
