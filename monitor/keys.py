"""The app keys: PARTS holds every part the root built; a few parts tests read have their own."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from monitor.health.results import ProbeResults
from monitor.http.shedding import LoadShedder
from monitor.storage.database import Database
from scheduler import EventBus
from workflows.engine import Engine

from .config import Config
from .parts import Parts

if TYPE_CHECKING:  # psycopg (22 MB) is imported only when storage.url is set
    from monitor.storage.postgres import PgDatabase

CONFIG = web.AppKey("config", Config)
DATABASE: web.AppKey[Database | PgDatabase] = web.AppKey("database")
REAPER = web.AppKey("reaper", asyncio.Task[None])
AUDIT = web.AppKey("audit", asyncio.Task[None])  # writes refusals (audit/trail.py)
BUS = web.AppKey("bus", EventBus)
RESULTS = web.AppKey("results", ProbeResults)
ENGINE = web.AppKey("engine", Engine)
SHEDDER = web.AppKey("shedder", LoadShedder)
HEAP = web.AppKey("heap", asyncio.Task[None])
PARTS = web.AppKey("parts", Parts)
