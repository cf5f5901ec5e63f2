"""The monitor's HTTP routes: `GET /v1/health`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from monitor.health.book import HealthBook
from monitor.http.errors import HttpError
from monitor.http.openapi import error_responses, json_content, path_param, query_param
from monitor.http.responses import json_response
from monitor.http.routes.registry import health_filter
from monitor.slo.book import WINDOWS, SloBook, WorkflowSlos
from registry import HealthState


class HealthRoutes:
    def __init__(self, book: HealthBook) -> None:
        self.book = book

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/v1/health", self.health)]

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


class SloRoutes:
    def __init__(
        self,
        slos: SloBook,
        services: set[str],
        clock: Callable[[], float],
        workflows: WorkflowSlos,
    ) -> None:
        self.slos, self.services, self.clock, self.workflows = slos, services, clock, workflows

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.get("/v1/services/{service}/slos", self.service_slos),
            web.get("/v1/workflows/{name}/slo", self.workflow_slo),
        ]

    async def workflow_slo(self, request: web.Request) -> web.Response:
        """A workflow's SLO: good = completed within its deadline."""
        name = request.match_info["name"]
        status = self.workflows.status(name, self.clock())
        if status is None:
            raise HttpError(404, f"no workflow named {name!r}")
        return json_response(status)

    async def service_slos(self, request: web.Request) -> web.Response:
        """Each SLO of a service: SLI, budget remaining, burn rates, this and last month's SLA."""
        service = request.match_info["service"]
        if service not in self.services:
            raise HttpError(404, f"service {service} is not configured (SLOs live in config.yaml)")
        statuses = self.slos.statuses(service, self.clock()) or []
        return json_response({"service": service, "slos": statuses})


def openapi_paths() -> dict[str, Any]:
    failure = {
        "type": "object",
        "properties": {"condition": {"type": "string"}, "observed": {"type": "string"}},
    }
    entry = {
        "type": "object",
        "required": ["service", "instance", "state", "since", "suppressed", "failing"],
        "properties": {
            "service": {"type": "string"},
            "instance": {"type": "string"},
            "state": {"type": "string", "enum": [state.value for state in HealthState]},
            "since": {"type": "number", "description": "unix time of the last state change"},
            "suppressed": {"type": "boolean"},
            "reason": {"type": "string"},
            "last_probe": {"type": ["object", "null"]},
            "failing": {"type": "array", "items": failure},
        },
    }
    return {
        "/v1/health": {
            "get": {
                "summary": "Every probed instance's health state",
                "operationId": "health",
                "parameters": [query_param("service"), query_param("state")],
                "responses": {
                    "200": {
                        "description": "instances",
                        "content": json_content(
                            {
                                "type": "object",
                                "properties": {"instances": {"type": "array", "items": entry}},
                            }
                        ),
                    },
                    **error_responses(400, 401),
                },
            }
        }
    }


def slo_openapi_paths() -> dict[str, Any]:
    ratio = {"type": ["number", "null"]}
    month = {
        "type": "object",
        "properties": {
            "month": {"type": "string"},
            "availability_percent": ratio,
            "downtime_minutes": ratio,
            "allowed_minutes": {"type": "number"},
        },
    }
    by_window = {"type": "object", "properties": {window: ratio for window in WINDOWS}}
    report: dict[str, Any] = {
        "sli": ratio,
        "error_budget_remaining": ratio,
        "error_budget_remaining_minutes": ratio,
        "sli_by_window": by_window,
        "burn_rates": by_window,
        "sla": {"type": "object", "properties": {"current": month, "previous": month}},
    }
    slo = {
        "type": "object",
        "required": ["name", "objective", "period", "sli", "error_budget_remaining", "burn_rates"],
        "properties": {
            "name": {"type": "string"},
            "objective": {"type": "number", "description": "percent"},
            "period": {"type": "string"},
            "kind": {"type": "string", "enum": ["availability", "latency"]},
            "latency_threshold": {"type": ["string", "null"]},
            **report,
        },
    }
    workflow_slo = {
        "type": "object",
        "required": ["workflow", "objective", "period", "sli", "error_budget_remaining"],
        "properties": {
            "workflow": {"type": "string"},
            "objective": {"type": "number", "description": "percent"},
            "period": {"type": "string"},
            "good": {"type": "string"},
            **report,
        },
    }
    return {
        "/v1/workflows/{name}/slo": {
            "parameters": [path_param("name", "workflow name")],
            "get": {
                "summary": "A workflow's SLO: processes completed within their deadline",
                "operationId": "workflowSlo",
                "responses": {
                    "200": {"description": "the SLO", "content": json_content(workflow_slo)},
                    **error_responses(401, 404),
                },
            },
        },
        "/v1/services/{service}/slos": {
            "parameters": [
                {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "summary": "A service's SLOs: SLI, error budget, burn rates, monthly SLA",
                "operationId": "serviceSlos",
                "responses": {
                    "200": {
                        "description": "SLOs (None where there is no data yet)",
                        "content": json_content(
                            {
                                "type": "object",
                                "properties": {
                                    "service": {"type": "string"},
                                    "slos": {"type": "array", "items": slo},
                                },
                            }
                        ),
                    },
                    **error_responses(401, 404),
                },
            },
        },
    }
