"""The monitor's HTTP routes: `GET /v1/health`."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.health.book import HealthBook
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.registry import health_filter
from registry import HealthState

table = RouteTable()


class Failure(BaseModel):
    condition: str | None = None
    observed: str | None = None


class InstanceHealth(BaseModel):
    service: str
    instance: str
    state: HealthState
    since: float = Field(description="unix time of the last state change")
    suppressed: bool
    reason: str | None = None
    last_probe: dict[str, Any] | None = None
    failing: list[Failure]


class HealthList(BaseModel):
    instances: list[InstanceHealth] = []


class HealthQuery(BaseModel):
    service: str = ""
    state: str = ""


class HealthRoutes:
    def __init__(self, book: HealthBook) -> None:
        self.book = book

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/v1/health",
        operation_id="health",
        summary="Every probed instance's health state",
        query=HealthQuery,
        replies=(Reply(status=200, description="instances", model=HealthList),),
        errors=(400, 401),
    )
    async def health(self, request: web.Request) -> web.Response:
        """Every probed instance: state, since when, last result, failing conditions."""
        service = request.query.get("service")
        states = health_filter(request, "state")
        rows = []
        for key in self.book.instance_keys():
            if service and key[0] != service:
                continue
            status = self.book.status(key)
            # HealthState is a StrEnum: "critical" in {HealthState.CRITICAL} holds.
            if status is not None and (states is None or status["state"] in states):
                rows.append(status)
        return json_response({"instances": rows})
