"""The SLO routes: a service's SLOs and a workflow's SLO, as the SLO book computes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import WorkflowName
from monitor.slo.book import SloBook
from monitor.slo.workflows import WorkflowSlos

table = RouteTable()
Ratio = float | None


class Month(BaseModel):
    month: str | None = None
    availability_percent: Ratio = None
    downtime_minutes: Ratio = None
    allowed_minutes: float | None = None


class Sla(BaseModel):
    current: Month | None = None
    previous: Month | None = None


class SloReport(BaseModel):
    """What a service's SLO and a workflow's share (None where there is no data yet)."""

    sli: Ratio
    error_budget_remaining: Ratio
    error_budget_remaining_minutes: Ratio = None
    sli_by_window: dict[str, Ratio] | None = None
    burn_rates: dict[str, Ratio] | None = None
    sla: Sla | None = None


class Slo(SloReport):
    name: str
    objective: float = Field(description="percent")
    period: str
    kind: Literal["availability", "latency"] | None = None
    source: Literal["probes", "calls"] | None = Field(
        default=None, description="what it measures: the daemon's probes or the workflow calls"
    )
    latency_threshold: str | None = None
    burn_rates: dict[str, Ratio]


class WorkflowSlo(SloReport):
    workflow: str
    objective: float = Field(description="percent")
    period: str
    good: str | None = None


class ServiceSlos(BaseModel):
    service: str | None = None
    slos: list[Slo] | None = None


class SloRoutes:
    def __init__(
        self,
        slos: SloBook,
        services: set[str],
        clock: Callable[[], float],
        workflows: WorkflowSlos,
    ) -> None:
        self.slos, self.services, self.clock, self.workflows = slos, services, clock, workflows

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/v1/services/{service}/slos",
        operation_id="serviceSlos",
        summary="A service's SLOs: SLI, error budget, burn rates, monthly SLA",
        replies=(
            Reply(
                status=200,
                description="SLOs (None where there is no data yet)",
                model=ServiceSlos,
            ),
        ),
        errors=(401, 404),
    )
    async def service_slos(self, request: web.Request) -> web.Response:
        """Each SLO of a service: SLI, budget remaining, burn rates, this and last month's SLA."""
        service = request.match_info["service"]
        if service not in self.services:
            raise HttpError(404, f"service {service} is not configured (SLOs live in config.yaml)")
        statuses = self.slos.statuses(service, self.clock()) or []
        return json_response({"service": service, "slos": statuses})

    @table.get(
        "/v1/workflows/{name}/slo",
        operation_id="workflowSlo",
        summary="A workflow's SLO: processes completed within their deadline",
        match=WorkflowName,
        replies=(Reply(status=200, description="the SLO", model=WorkflowSlo),),
        errors=(401, 404),
    )
    async def workflow_slo(self, request: web.Request) -> web.Response:
        """A workflow's SLO: good = completed within its deadline."""
        name = request.match_info["name"]
        status = self.workflows.status(name, self.clock())
        if status is None:
            raise HttpError(404, f"no workflow named {name!r}")
        return json_response(status)
