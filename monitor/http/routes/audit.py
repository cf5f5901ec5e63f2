"""GET /v1/audit: the trail, filtered, in cursor pages (DESIGN §3 Audit; scope audit:read)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.audit.abc import MAX_LIMIT, AuditQuery, parse_time
from monitor.audit.trail import AuditTrail
from monitor.http.audit import filter_text
from monitor.http.auth import Authorizer
from monitor.http.body import query_int
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable

table = RouteTable()


class AuditParams(BaseModel):
    since: str = Field(default="", description="records at or after (RFC 3339 or Unix seconds)")
    until: str = Field(default="", description="records before (RFC 3339 or Unix seconds)")
    actor: str = Field(default="", description="a token's name, `anonymous`, `sighup`...")
    action: str = Field(default="", description="e.g. `process.start`, or a prefix: `process.*`")
    target: str = Field(default="", description="e.g. `payments/p-1`, or a prefix: `payments/*`")
    limit: str = Field(default="", description=f"1-{MAX_LIMIT}, default 100")
    cursor: str = Field(default="", description="next_cursor of the previous page")


class AuditRecordJson(BaseModel):
    id: int | None = Field(description="the record's place in the trail (refusals: null)")
    time: str = Field(description="RFC 3339, UTC")
    actor: str
    action: str = Field(description="<resource>.<verb>, e.g. instance.register, auth.refused")
    target: str
    outcome: int = Field(description="the HTTP status answered")
    request_id: str = Field(description="the X-Request-Id of the answer")
    client: str = Field(description="the caller's address")
    count: int = Field(description="refusals: how many in that minute; else 1")


class AuditPage(BaseModel):
    records: list[AuditRecordJson]
    next_cursor: str | None


class AuditRoutes:
    def __init__(self, trail: AuditTrail, auth: Authorizer) -> None:
        self.trail, self.auth = trail, auth

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/v1/audit",
        operation_id="listAudit",
        summary="The audit trail, oldest first, with filters and cursor paging",
        query=AuditParams,
        replies=(Reply(status=200, description="a page", model=AuditPage),),
        errors=(400, 401, 403, 503),
        scope="audit",
    )
    async def list_audit(self, request: web.Request) -> web.Response:
        self.auth.require(request, "audit", "read")
        query = request.query
        page = AuditQuery(
            since=_time(query, "since"),
            until=_time(query, "until"),
            actor=filter_text(query, "actor"),
            action=filter_text(query, "action"),
            target=filter_text(query, "target"),
            after=query_int(query.get("cursor", "0") or "0", "cursor", 0, 2**62),
            limit=query_int(query.get("limit", "100") or "100", "limit", 1, MAX_LIMIT) + 1,
        )
        records = await self.trail.list(page)
        more = len(records) >= page.limit
        records = records[: page.limit - 1]
        return json_response(
            {
                "records": [record.json() for record in records],
                "next_cursor": str(records[-1].id) if more and records else None,
            }
        )


def _time(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name)
    if not raw:
        return None
    try:
        at = parse_time(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be RFC 3339 or Unix seconds") from None
    if not math.isfinite(at):
        raise HttpError(400, f"{name} must be a finite time")
    return at
