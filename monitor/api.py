"""The monitor's HTTP routes: `GET /v1/health`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from registry import HealthState
from registry.errors import ApiError
from registry.openapi import error_responses, json_content
from registry.responses import json_response

from .health import HealthBook


class HealthRoutes:
    def __init__(self, book: HealthBook) -> None:
        self.book = book

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/v1/health", self.health)]

    async def health(self, request: web.Request) -> web.Response:
        """Every probed instance: state, since when, last result, failing conditions."""
        service = request.query.get("service")
        states = _states(request.query.get("state"))
        rows = []
        for key in self.book.instance_keys():
            if service and key[0] != service:
                continue
            status = self.book.status(key)
            if status is not None and (states is None or status["state"] in states):
                rows.append(status)
        return json_response({"instances": rows})


def _states(raw: str | None) -> set[str] | None:
    if not raw:
        return None
    states = set(raw.split(","))
    allowed = {state.value for state in HealthState}
    if not states <= allowed:
        raise ApiError(400, f"state must be one or more of: {', '.join(sorted(allowed))}")
    return states


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
                "parameters": [
                    {
                        "name": "service",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
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
