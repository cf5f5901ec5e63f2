"""The status page's routes: HTML for people (monitor/page/ renders it)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import AssetName, ProcessPageId, ServiceName
from monitor.page.status_page import StatusPage

table = RouteTable()
HTML = (Reply(status=200, description="HTML", media="text/html"),)
ERRORS = (400, 401, 404)


class PageQuery(BaseModel):
    page: int = Field(default=1, ge=1, description="1-based page number")


class PageRoutes:
    def __init__(self, page: StatusPage) -> None:
        self.page = page

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/",
        operation_id="statusPage",
        summary="Status page: services by tag, health, uptime, SLOs",
        query=PageQuery,
        replies=HTML,
        errors=ERRORS,
    )
    async def overview(self, request: web.Request) -> web.Response:
        return await self.page.overview(request.query.get("page"))

    @table.get(
        "/services/{service}",
        operation_id="servicePage",
        summary="Status of one service: instances, failing conditions, SLOs, recent changes",
        match=ServiceName,
        query=PageQuery,
        replies=HTML,
        errors=ERRORS,
    )
    async def service(self, request: web.Request) -> web.Response:
        return await self.page.service(request.match_info["service"], request.query.get("page"))

    @table.get(
        "/workflows",
        operation_id="workflowsPage",
        summary="Workflows: processes by status, recent processes",
        replies=HTML,
        errors=ERRORS,
    )
    async def workflows(self, request: web.Request) -> web.Response:
        return await self.page.workflows()

    @table.get(
        "/processes/{id}",
        operation_id="processPage",
        summary="One process as a timeline of steps and attempts",
        match=ProcessPageId,
        replies=HTML,
        errors=ERRORS,
    )
    async def process(self, request: web.Request) -> web.Response:
        return await self.page.process(request.match_info["id"])

    @table.get(
        "/static/{name}",
        operation_id="pageAsset",
        summary="The page's stylesheet and script",
        match=AssetName,
        replies=HTML,
        errors=ERRORS,
    )
    async def asset(self, request: web.Request) -> web.Response:
        return await self.page.asset(request.match_info["name"])
