"""The status page's routes: HTML for people (monitor/page/ renders it)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.http.audit import filter_text, refused
from monitor.http.auth import Authorizer
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import AssetName, ProcessPageId, ServiceName
from monitor.page.status_page import StatusPage

table = RouteTable()
HTML = (Reply(status=200, description="HTML", media="text/html"),)
ERRORS = (400, 401, 404)


class PageQuery(BaseModel):
    page: int = Field(default=1, ge=1, description="1-based page number")


class AuditPageQuery(BaseModel):
    actor: str = Field(default="", description="a token's name, `anonymous`, `sighup`...")
    action: str = Field(default="", description="e.g. `process.start`, or a prefix: `process.*`")


class PageRoutes:
    def __init__(self, page: StatusPage, auth: Authorizer) -> None:
        self.page, self.auth = page, auth

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
        return await self.page.overview(
            request.query.get("page"), audit_link=self.auth.reads_audit(request)
        )

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
        return await self.page.service(
            request.match_info["service"],
            request.query.get("page"),
            audit_link=self.auth.reads_audit(request),
        )

    @table.get(
        "/workflows",
        operation_id="workflowsPage",
        summary="Workflows: processes by status, recent processes",
        replies=HTML,
        errors=ERRORS,
    )
    async def workflows(self, request: web.Request) -> web.Response:
        return await self.page.workflows(audit_link=self.auth.reads_audit(request))

    @table.get(
        "/processes/{id}",
        operation_id="processPage",
        summary="One process as a timeline of steps and attempts",
        match=ProcessPageId,
        replies=HTML,
        errors=ERRORS,
    )
    async def process(self, request: web.Request) -> web.Response:
        return await self.page.process(
            request.match_info["id"], audit_link=self.auth.reads_audit(request)
        )

    @table.get(
        "/audit",
        operation_id="auditPage",
        summary="The audit trail's newest records, filtered by actor and action",
        query=AuditPageQuery,
        replies=(
            *HTML,
            Reply(status=403, description="no audit:read: a page saying so", media="text/html"),
        ),
        errors=(400, 401),
        scope="audit",
    )
    async def audit(self, request: web.Request) -> web.Response:
        if not self.auth.reads_audit(request):
            refused(request, 403)  # counted in the trail, as GET /v1/audit's refusals are
            return await self.page.forbidden(
                "Reading the audit trail needs a token with the audit:read scope.",
                request.path_qs,
                audit_link=False,
            )
        return await self.page.audit(
            filter_text(request.query, "actor") or "", filter_text(request.query, "action") or ""
        )

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
