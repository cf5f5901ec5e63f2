"""The app keys under which the composition root keeps each part it built."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.health.checker import HealthChecker
from monitor.health.maintenance import MaintenanceCalendar
from monitor.health.metrics import ProbeMetrics
from monitor.health.results import ResultStore
from monitor.http.auth import Authorizer
from monitor.http.routes.registry import RegistryRoutes
from monitor.http.routes.slos import SloRoutes
from monitor.http.routes.workflows import WorkflowRoutes
from monitor.http.shedding import LoadShedder
from monitor.notify.notifier import Notifier
from monitor.page.status_page import StatusPage
from monitor.slo.book import SloBook, SloMetrics, WorkflowSlos
from monitor.storage.database import Database
from registry import Catalog
from scheduler import EventBus, Scheduler
from workflows.engine import Engine

from .config import Config
from .reload import LiveConfig, Reloader

CONFIG = web.AppKey("config", Config)
DATABASE = web.AppKey("database", Database)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", CollectorRegistry)
REAPER = web.AppKey("reaper", asyncio.Task[None])
BUS = web.AppKey("bus", EventBus)
SCHEDULER = web.AppKey("scheduler", Scheduler)
CHECKER = web.AppKey("checker", HealthChecker)
RESULTS = web.AppKey("results", ResultStore)
PROBE_METRICS = web.AppKey("probe_metrics", ProbeMetrics)
SLOS = web.AppKey("slos", SloBook)
SLO_METRICS = web.AppKey("slo_metrics", SloMetrics)
ENGINE = web.AppKey("engine", Engine)
WORKFLOW_SLOS = web.AppKey("workflow_slos", WorkflowSlos)
NOTIFIER = web.AppKey("notifier", Notifier)
PAGE = web.AppKey("page", StatusPage)
LIVE_CONFIG = web.AppKey("live_config", LiveConfig)
RELOADER = web.AppKey("reloader", Reloader)
SLO_ROUTES = web.AppKey("slo_routes", SloRoutes)
CALENDAR = web.AppKey("calendar", MaintenanceCalendar)
REGISTRY_ROUTES = web.AppKey("registry_routes", RegistryRoutes)
SHEDDER = web.AppKey("shedder", LoadShedder)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
WORKFLOW_ROUTES = web.AppKey("workflow_routes", WorkflowRoutes)
HEAP = web.AppKey("heap", asyncio.Task[None])
