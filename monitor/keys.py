"""The app keys under which the composition root keeps each part it built."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.health.checker import HealthChecker
from monitor.health.maintenance import MaintenanceCalendar
from monitor.health.metrics import ProbeMetrics
from monitor.health.results import ProbeResults
from monitor.http.auth import Authorizer
from monitor.http.shedding import LoadShedder
from monitor.notify.notifier import Notifier
from monitor.page.status_page import StatusPage
from monitor.slo import SloBook, SloMetrics, WorkflowSlos
from monitor.storage.database import Database
from registry import Catalog
from scheduler import EventBus, Scheduler
from workflows.engine import Engine

from .config import Config
from .parts import LiveConfig, Parts
from .reload import Reloader

CONFIG = web.AppKey("config", Config)
DATABASE = web.AppKey("database", Database)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", CollectorRegistry)
REAPER = web.AppKey("reaper", asyncio.Task[None])
BUS = web.AppKey("bus", EventBus)
SCHEDULER = web.AppKey("scheduler", Scheduler)
CHECKER = web.AppKey("checker", HealthChecker)
RESULTS = web.AppKey("results", ProbeResults)
PROBE_METRICS = web.AppKey("probe_metrics", ProbeMetrics)
SLOS = web.AppKey("slos", SloBook)
SLO_METRICS = web.AppKey("slo_metrics", SloMetrics)
ENGINE = web.AppKey("engine", Engine)
WORKFLOW_SLOS = web.AppKey("workflow_slos", WorkflowSlos)
NOTIFIER = web.AppKey("notifier", Notifier)
PAGE = web.AppKey("page", StatusPage)
LIVE_CONFIG = web.AppKey("live_config", LiveConfig)
RELOADER = web.AppKey("reloader", Reloader)
CALENDAR = web.AppKey("calendar", MaintenanceCalendar)
SHEDDER = web.AppKey("shedder", LoadShedder)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
HEAP = web.AppKey("heap", asyncio.Task[None])
PARTS = web.AppKey("parts", Parts)
