"""HTTP routes of the registry: register, heartbeat, deregister, list, blocking queries, http_sd."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, RootModel

from monitor.http.audit import answered
from monitor.http.auth import Authorizer
from monitor.http.body import parse_body
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import InstanceKey, ServiceName
from registry import model as registry_model
from registry.catalog import Catalog, InstanceStatus
from registry.durations import parse_duration
from registry.model import HealthState, ProbeSpec, RegistrationBody, is_valid_name
from registry.sd import sd_groups
from registry.targets import TargetPolicy

INDEX_HEADER = "X-Registry-Index"
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
MIN_TTL = 1.0


@dataclass(frozen=True, kw_only=True)
class LeaseDefaults:
    ttl: timedelta = timedelta(seconds=30)
    deregister_after: timedelta = timedelta(minutes=10)


ProbeCheck = Callable[[str, ProbeSpec | None], object]
table = RouteTable()
INDEX = {INDEX_HEADER: "registry modify index"}


class Lease(BaseModel):
    expires_in: float | None = None
    lapsed: bool | None = None


class Instance(BaseModel):
    service: str
    id: str
    url: str
    tags: list[str]
    meta: dict[str, str]
    probe: dict[str, Any] | None = None
    ttl: str | None = None
    deregister_after: str | None = None
    static: bool
    health: HealthState
    registered_at: str | None = None
    updated_at: str | None = None
    lease: Lease | None = None


class Renewed(BaseModel):
    """A heartbeat's answer: small, the hottest route's client needs only the lease."""

    service: str
    id: str
    health: HealthState
    lease: Lease | None = None


class ServiceSummary(BaseModel):
    name: str
    instances: int
    health: dict[str, int]
    tags: list[str]


class Services(BaseModel):
    services: list[ServiceSummary]


class Service(BaseModel):
    service: str
    instances: list[Instance]


class TargetGroup(BaseModel):
    targets: list[str]
    labels: dict[str, str]


class TargetGroups(RootModel[list[TargetGroup]]):
    pass


HEALTH = Field(
    default="",
    description="comma-separated health states to keep",
    examples=["passing", "passing,warning"],
)


class ServiceQuery(BaseModel):
    health: str = HEALTH
    index: int = Field(
        default=0, ge=0, description="return once the service's index passes this value"
    )
    wait: str = Field(
        default="",
        description="longest wait with index (default 5m, at most 10m)",
        examples=["30s"],
    )


class SdQuery(BaseModel):
    service: str = ""
    health: str = HEALTH


class RegistryRoutes:
    def __init__(
        self,
        catalog: Catalog,
        auth: Authorizer,
        leases: LeaseDefaults,
        check_probe: ProbeCheck | None = None,
        targets: TargetPolicy | None = None,
    ) -> None:
        self.catalog = catalog
        self.auth = auth
        self.leases = leases
        self.targets = targets or TargetPolicy()  # replaced on a config reload
        # From the monitor: parses conditions, so a bad one is a 422 here, not a probe crash.
        self.check_probe = check_probe

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.put(
        "/v1/services/{service}/instances/{id}",
        operation_id="registerInstance",
        summary="Register or update an instance (idempotent)",
        match=InstanceKey,
        body=RegistrationBody,
        replies=(
            Reply(status=200, description="updated", model=Instance, headers=INDEX),
            Reply(status=201, description="created", model=Instance, headers=INDEX),
        ),
        errors=(400, 409, 413, 422, 503),
        scope="register",
        audit="instance.register",
    )
    async def register(self, request: web.Request) -> web.Response:
        service, instance_id = _names(request)
        self.auth.require(request, "register", service)
        body = await parse_body(request, RegistrationBody)
        refusal = self.targets.refusal(body.url) if body.url is not None else None
        if refusal is not None:
            details = [{"field": "url", "message": refusal}]
            raise HttpError(403, refusal, code="target_not_allowed", details=details)
        ttl = body.lease_seconds(self.leases.ttl)
        if ttl is not None and ttl < MIN_TTL:
            raise HttpError(422, f"ttl must be at least {MIN_TTL:g}s", details=[{"field": "ttl"}])
        if self.check_probe is not None:
            try:
                self.check_probe(service, body.probe)
            except ValueError as exc:
                details = [{"field": "probe", "message": str(exc)}]
                raise HttpError(422, "invalid probe settings", details=details) from None
        deregister_after = body.deregister_after or self.leases.deregister_after
        now = self.catalog.now()
        instance = registry_model.Instance(
            service=service,
            id=instance_id,
            url=body.url or "",
            tags=body.tags,
            meta=body.meta,
            probe=body.probe,
            ttl=ttl,
            deregister_after=deregister_after.total_seconds(),
            registered_at=now,
            updated_at=now,
        )
        status, created = await self.catalog.register(
            instance, on_write=lambda created: answered(request, 201 if created else 200)
        )
        return _json(instance_json(status), self.catalog.index, status=201 if created else 200)

    @table.post(
        "/v1/services/{service}/instances/{id}/heartbeat",
        operation_id="heartbeat",
        summary="Renew the instance's lease",
        match=InstanceKey,
        replies=(Reply(status=200, description="renewed", model=Renewed, headers=INDEX),),
        errors=(400, 404, 409),
        scope="register",
    )
    async def heartbeat(self, request: web.Request) -> web.Response:
        service, instance_id = _names(request)
        self.auth.require(request, "register", service)
        status = self.catalog.heartbeat(service, instance_id)
        # Small on purpose: this is the hottest route, and the client needs only the lease.
        body = {
            "service": service,
            "id": instance_id,
            "health": status.health.value,
            "lease": _lease_json(status),
        }
        return _json(body, self.catalog.index)

    @table.delete(
        "/v1/services/{service}/instances/{id}",
        operation_id="deregisterInstance",
        summary="Deregister an instance",
        match=InstanceKey,
        replies=(Reply(status=204, description="deregistered", body=False, headers=INDEX),),
        errors=(400, 404, 409, 503),
        scope="register",
        audit="instance.deregister",
    )
    async def deregister(self, request: web.Request) -> web.Response:
        service, instance_id = _names(request)
        self.auth.require(request, "register", service)
        await self.catalog.deregister(service, instance_id)
        return web.Response(status=204, headers={INDEX_HEADER: str(self.catalog.index)})

    @table.get(
        "/v1/services",
        operation_id="listServices",
        summary="Every service with instance counts by health",
        replies=(Reply(status=200, description="services", model=Services, headers=INDEX),),
        errors=(401,),
    )
    async def list_services(self, request: web.Request) -> web.Response:
        services = [
            {
                "name": name,
                "instances": len(statuses),
                "health": _health_counts(statuses),
                "tags": sorted({tag for s in statuses for tag in s.instance.tags}),
            }
            for name, statuses in self.catalog.services().items()
        ]
        return _json({"services": services}, self.catalog.index)

    @table.get(
        "/v1/services/{service}",
        operation_id="getService",
        summary="A service's instances; a blocking query with index and wait",
        match=ServiceName,
        query=ServiceQuery,
        replies=(
            Reply(
                status=200,
                description="instances of the service (empty when none)",
                model=Service,
                headers=INDEX,
            ),
        ),
        errors=(400, 401),
    )
    async def get_service(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        if not is_valid_name(service):
            raise HttpError(400, "invalid service name", details=[{"field": "service"}])
        health = health_filter(request)
        index = _query_index(request)
        if index is not None:
            await self.catalog.wait_for_change(service, index, _query_wait(request))
        statuses = self.catalog.instances(service)
        if health is not None:
            statuses = [s for s in statuses if s.health in health]
        body = {"service": service, "instances": [instance_json(s) for s in statuses]}
        return _json(body, self.catalog.service_index(service))

    @table.get(
        "/v1/sd",
        operation_id="httpSd",
        summary="Prometheus http_sd target groups, one per instance",
        query=SdQuery,
        replies=(Reply(status=200, description="target groups", model=TargetGroups),),
        errors=(400, 401),
    )
    async def http_sd(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        health = health_filter(request)
        statuses = self.catalog.instances(service or None)
        if health is not None:
            statuses = [s for s in statuses if s.health in health]
        return _json(sd_groups(statuses), self.catalog.index)


def instance_json(status: InstanceStatus) -> dict[str, Any]:
    return {
        **status.instance.document,
        "health": status.health.value,
        "lease": _lease_json(status),
    }


def _lease_json(status: InstanceStatus) -> dict[str, Any] | None:
    if status.lease_expires_in is None:
        return None
    return {"expires_in": round(status.lease_expires_in, 3), "lapsed": status.lapsed}


def _json(body: Any, index: int, *, status: int = 200) -> web.Response:
    return json_response(body, status=status, headers={INDEX_HEADER: str(index)})


def _names(request: web.Request) -> tuple[str, str]:
    service, instance_id = request.match_info["service"], request.match_info["id"]
    bad = [
        {"field": field, "message": "must be 1 to 128 characters of A-Z a-z 0-9 . _ -"}
        for field, value in (("service", service), ("id", instance_id))
        if not is_valid_name(value)
    ]
    if bad:
        raise HttpError(400, "invalid service name or instance id", details=bad)
    return service, instance_id


def _health_counts(statuses: list[InstanceStatus]) -> dict[str, int]:
    counts = dict.fromkeys((state.value for state in HealthState), 0)
    for status in statuses:
        counts[status.health.value] += 1
    return counts


def health_filter(request: web.Request, parameter: str = "health") -> set[HealthState] | None:
    """`?health=passing,warning` as states; None when absent; 400 naming the allowed ones."""
    raw = request.query.get(parameter)
    if not raw:
        return None
    try:
        return {HealthState(value) for value in raw.split(",")}
    except ValueError:
        allowed = ", ".join(state.value for state in HealthState)
        raise HttpError(400, f"{parameter} must be one or more of: {allowed}") from None


def _query_index(request: web.Request) -> int | None:
    raw = request.query.get("index")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, "index must be a non-negative integer", details=[{"field": "index"}])
    return int(raw)


def _query_wait(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        wait = DEFAULT_WAIT
    else:
        try:
            wait = min(parse_duration(raw).total_seconds(), MAX_WAIT)
        except ValueError as exc:
            raise HttpError(400, str(exc), details=[{"field": "wait"}]) from None
    # Up to wait/16 of jitter spreads the herd of clients that all started waiting together.
    return wait + random.uniform(0, wait / 16)
