"""The daemon's own routes: liveness, readiness, Prometheus metrics and /openapi.json."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import BaseModel

from monitor.health.metrics import ProbeMetrics
from monitor.http.document import openapi_document
from monitor.http.errors import error_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes import (
    audit,
    cluster,
    events,
    health,
    login,
    page,
    slos,
    tasks,
    workflows,
)
from monitor.http.routes import registry as registry_routes
from monitor.metrics.exposition import GzipJoin
from monitor.slo.metrics import SloMetrics
from monitor.storage.database import Database
from registry import Catalog
from registry.metrics import InstanceCounts, instance_counts, render_instance_counts
from scheduler import Scheduler

if TYPE_CHECKING:  # psycopg (22 MB) is imported only when storage.url is set
    from monitor.storage.postgres import PgDatabase

table = RouteTable()

WRITE_BYTES = 256 * 1024  # a scrape is sent in pieces of about this much (after gzip)
COUNTS_PER_TURN = 1000  # services whose `hms_registry_instances` lines are rendered per turn

log = logging.getLogger(__name__)


class Liveness(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checks: dict[str, bool]
    writable: bool


class OperationsRoutes:
    """What orchestrators, Prometheus and API clients ask of the daemon itself."""

    def __init__(
        self,
        *,
        database: Database | PgDatabase,
        scheduler: Scheduler,
        registry_running: Callable[[], bool],
        catalog: Catalog,
        probe_metrics: ProbeMetrics,
        metrics: CollectorRegistry,
        slo_metrics: SloMetrics,
        document: Callable[[], dict[str, Any]],
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        """`leads()`: whether this replica exports the cluster-wide gauges (the registry's
        instance counts, `hms_maintenance`): the leader only, so a sum over replicas
        counts each once."""
        self.database, self.scheduler, self.registry_running = database, scheduler, registry_running
        self.catalog, self.probe_metrics = catalog, probe_metrics
        self.metrics, self.slo_metrics = metrics, slo_metrics
        self.document, self.leads = document, leads

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/healthz",
        operation_id="healthz",
        summary="Liveness",
        replies=(Reply(status=200, description="status", model=Liveness),),
        shed=False,
    )
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @table.get(
        "/readyz",
        operation_id="readyz",
        summary="Readiness: store open, background jobs running",
        replies=(Reply(status=200, description="status", model=Ready),),
        errors=(503,),
        shed=False,
    )
    async def readyz(self, request: web.Request) -> web.Response:
        checks = {
            "store": self.database.is_open,
            "registry": self.registry_running(),
            "scheduler": self.scheduler.running,
        }
        # A failing disk does not make the daemon unready: reads, probes and the page work.
        writable = self.database.writable
        if all(checks.values()):
            return web.json_response({"status": "ready", "checks": checks, "writable": writable})
        failing = [name for name, ok in checks.items() if not ok]
        return error_response(503, f"not ready: {', '.join(failing)}", details=checks)

    @table.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus exposition",
        replies=(Reply(status=200, description="metrics", media="text/plain"),),
        errors=(401,),
        shed=False,
    )
    async def exposition(self, request: web.Request) -> web.StreamResponse:
        # Streamed: the big families are counted, rendered, compressed and sent a slice at
        # a time, the loop serving others in between (monitor/health/metrics.py).
        join = GzipJoin() if "gzip" in request.headers.get("Accept-Encoding", "") else None
        response = web.StreamResponse(
            headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Vary": "Accept-Encoding"}
        )
        if join is not None:
            response.headers["Content-Encoding"] = "gzip"
        if request.method == "HEAD":  # aiohttp would send a streamed HEAD's body, unframed
            await response.prepare(request)
            return response
        # Counting first also expires due leases, so the expirations counter includes them.
        leads = self.leads()
        counts = await instance_counts(self.catalog) if leads else []
        small = generate_latest(self.metrics)
        slos = await self.slo_metrics.current()  # rendered and deflated once a minute
        try:
            await response.prepare(request)
            pending = [join.start(), join.add(small)] if join is not None else [small]
            size = 0
            async for text in self._texts(counts, leads):
                piece = join.add(text.encode()) if join is not None else text.encode()
                pending.append(piece)
                size += len(piece)
                if size >= WRITE_BYTES:
                    await response.write(b"".join(pending))
                    pending, size = [], 0
            pending.append(join.end(slos) if join is not None else slos.text)
            await response.write(b"".join(pending))
            await response.write_eof()
        except Exception as exc:
            transport = request.transport
            if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
                return response  # the scraper hung up (its scrape_timeout, say): no one to answer
            # Part of the body may have gone: an error answer now would land inside it. The
            # connection is cut, so the scraper sees a broken response, not a short one.
            log.exception("GET /metrics failed while streaming")
            if transport is not None:
                transport.close()
        return response

    async def _texts(self, counts: InstanceCounts, leads: bool) -> AsyncIterator[str]:
        """The instance counts, then the probe families, a slice per turn of the loop."""
        for start in range(0, max(1, len(counts)), COUNTS_PER_TURN):
            yield render_instance_counts(counts[start : start + COUNTS_PER_TURN], head=start == 0)
            await asyncio.sleep(0)
        async for text in self.probe_metrics.texts(maintenance=leads):
            yield text

    @table.get(
        "/openapi.json",
        operation_id="openapi",
        summary="This document",
        replies=(Reply(status=200, description="OpenAPI 3.1"),),
        errors=(401,),
    )
    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.document())


def daemon_document(workflow_routes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """/openapi.json: every declared route. `workflow_routes`: each workflow's `route:`
    (config.yaml) -> its name, served by the request router."""
    routed = workflow_routes or {}
    return openapi_document(
        [
            *table.routes,
            *registry_routes.table.routes,
            *health.table.routes,
            *slos.table.routes,
            *workflows.table.routes,
            *tasks.table.routes,
            *events.table.routes,
            *page.table.routes,
            *login.table.routes,
            *cluster.table.routes,
            *audit.table.routes,
            *(workflows.workflow_route(path, name) for path, name in routed.items()),
        ],
        version=_version(),
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hms-mgmt")
    except PackageNotFoundError:
        return "0+unknown"
