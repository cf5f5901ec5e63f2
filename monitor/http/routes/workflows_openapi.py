"""The workflow and event routes' part of /openapi.json."""

from __future__ import annotations

from typing import Any

from monitor.http.openapi import error_responses, json_content, path_param, query_param
from workflows.stores.sqlite import STATUSES

_OBJECT = {"type": "object"}
_STARTED = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "created": {"type": "boolean", "description": "false: the idempotency key's process"},
    },
}
_SUMMARY_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "workflow": {"type": "string"},
    "status": {"type": "string", "enum": list(STATUSES)},
    "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
    "finished_at": {"type": ["number", "null"]},
    "deadline_at": {"type": ["number", "null"]},
    "deadline_missed": {"type": "boolean"},
    "error": {"type": ["string", "null"]},
}
_SUMMARY_REQUIRED = ["id", "workflow", "status", "created_at"]
_SUMMARY = {"type": "object", "required": _SUMMARY_REQUIRED, "properties": _SUMMARY_PROPERTIES}
_PROCESS = {
    "type": "object",
    "required": [*_SUMMARY_REQUIRED, "input", "outputs", "history"],
    "properties": {
        **_SUMMARY_PROPERTIES,
        "idempotency_key": {"type": ["string", "null"]},
        "current_step": {"type": ["string", "null"]},
        "waiting_for": {
            "type": ["object", "null"],
            "description": "while waiting: kind (delay, retry, event), until (epoch seconds, "
            "null: no limit) and detail",
            "properties": {
                "kind": {"type": "string", "enum": ["delay", "retry", "event"]},
                "until": {"type": ["number", "null"]},
                "detail": {"type": "string"},
            },
        },
        "steps": {
            "type": "array",
            "description": "every step of the definition, those not yet run included",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": [
                            "pending",
                            "running",
                            "waiting",
                            "completed",
                            "failed",
                            "compensated",
                        ],
                    },
                },
            },
        },
        "input": _OBJECT,
        "outputs": _OBJECT,
        "history": {"type": "array", "items": _OBJECT},
    },
}
_WAIT = query_param("wait", "wait up to this long (e.g. 30s, at most 5m) for the process to end")
_PROCESS_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _start(summary: str, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation,
        "parameters": [_WAIT],
        "requestBody": {"required": False, "content": json_content(body)},
        "responses": {
            "200": {"description": "ended within `wait`", "content": json_content(_PROCESS)},
            "202": {"description": "started (or running)", "content": json_content(_STARTED)},
            **error_responses(400, 401, 403, 404, 422),
        },
    }


def paths(routes: dict[str, str] | None = None) -> dict[str, Any]:
    """`routes`: each workflow's request-router path -> workflow name."""
    start_body = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "input": _OBJECT,
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
        },
    }
    out: dict[str, Any] = {
        "/v1/workflows": {
            "get": {
                "summary": "Workflow definitions with their processes counted by status",
                "operationId": "listWorkflows",
                "responses": {
                    "200": {"description": "definitions", "content": json_content(_OBJECT)},
                    **error_responses(401),
                },
            }
        },
        "/v1/workflows/{name}": {
            "parameters": [path_param("name", "workflow name")],
            "post": _start("Start a process", "startWorkflow", start_body),
        },
        "/v1/processes": {
            "get": {
                "summary": "Processes, newest first, with filters and cursor paging",
                "operationId": "listProcesses",
                "parameters": [
                    query_param("workflow", "only this workflow"),
                    query_param("status", "only this status"),
                    query_param("limit", "1-1000, default 100"),
                    query_param("cursor", "next_cursor of the previous page"),
                ],
                "responses": {
                    "200": {
                        "description": "a page",
                        "content": json_content(
                            {
                                "type": "object",
                                "properties": {
                                    "processes": {"type": "array", "items": _SUMMARY},
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            }
                        ),
                    },
                    **error_responses(400, 401),
                },
            }
        },
        "/v1/processes/{id}": {
            "parameters": [_PROCESS_ID],
            "get": {
                "summary": "A process: status, input, outputs and every attempt",
                "operationId": "getProcess",
                "responses": {
                    "200": {"description": "the process", "content": json_content(_PROCESS)},
                    **error_responses(401, 404),
                },
            },
        },
        "/v1/processes/{id}/cancel": {
            "parameters": [_PROCESS_ID],
            "post": {
                "summary": "Cancel: stop and compensate the done steps",
                "operationId": "cancelProcess",
                "responses": {
                    "202": {"description": "cancelling", "content": json_content(_STARTED)},
                    **error_responses(401, 403, 404, 409),
                },
            },
        },
        "/v1/events/{topic}": {
            "parameters": [path_param("topic", "event topic")],
            "post": {
                "summary": "Publish an event (stored; starts triggered workflows)",
                "operationId": "publishEvent",
                "requestBody": {"required": False, "content": json_content(_OBJECT)},
                "responses": {
                    "202": {"description": "published", "content": json_content(_OBJECT)},
                    **error_responses(400, 401, 403, 422),
                },
            },
        },
        "/v1/events": {
            "get": {
                "summary": "Server-Sent Events of the bus",
                "operationId": "streamEvents",
                "parameters": [
                    query_param("topics", "comma-separated topic globs, default *"),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "first send the stored events after this id",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "an event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **error_responses(400, 401),
                },
            }
        },
    }
    for route, name in (routes or {}).items():
        out[route] = {
            "post": _start(f"Start {name} with the body as input", f"route_{name}", _OBJECT)
        }
    return out
