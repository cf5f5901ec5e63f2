"""The registry's part of the OpenAPI 3.1 document the daemon serves at /openapi.json."""

from __future__ import annotations

from typing import Any

from registry.model import HealthState, RegistrationBody

JSON = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def error_responses(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"description": "error", "content": json_content(ref("Error"))}
        for status in statuses
    }


def path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
    }


def query_param(
    name: str, description: str | None = None, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An optional query parameter (a string unless `schema` says otherwise)."""
    param: dict[str, Any] = {"name": name, "in": "query", "required": False}
    if description is not None:
        param["description"] = description
    param["schema"] = schema or {"type": "string"}
    return param


HEALTH_QUERY = query_param(
    "health",
    "comma-separated health states to keep",
    {"type": "string", "examples": ["passing", "passing,warning"]},
)

INDEX_HEADER = {
    "X-Registry-Index": {"description": "registry modify index", "schema": {"type": "integer"}}
}

SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


def components() -> dict[str, Any]:
    body = RegistrationBody.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = body.pop("$defs", {})
    health = {"type": "string", "enum": [state.value for state in HealthState]}
    instance = {
        "type": "object",
        "required": ["service", "id", "url", "tags", "meta", "health", "static"],
        "properties": {
            "service": {"type": "string"},
            "id": {"type": "string"},
            "url": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "probe": {"type": ["object", "null"]},
            "ttl": {"type": ["string", "null"]},
            "deregister_after": {"type": "string"},
            "static": {"type": "boolean"},
            "health": health,
            "registered_at": {"type": ["string", "null"]},
            "updated_at": {"type": ["string", "null"]},
            "lease": {
                "type": ["object", "null"],
                "properties": {
                    "expires_in": {"type": "number"},
                    "lapsed": {"type": "boolean"},
                },
            },
        },
    }
    return {
        "RegistrationBody": body,
        **defs,
        "HealthState": health,
        "Instance": instance,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "details": {},
                    },
                }
            },
        },
    }


def paths() -> dict[str, Any]:
    service = path_param("service", "service name")
    instance_id = path_param("id", "instance id")
    instance_response = {"content": json_content(ref("Instance")), "headers": INDEX_HEADER}
    return {
        "/v1/services/{service}/instances/{id}": {
            "parameters": [service, instance_id],
            "put": {
                "summary": "Register or update an instance (idempotent)",
                "operationId": "registerInstance",
                "security": SECURITY,
                "requestBody": {
                    "required": True,
                    "content": json_content(ref("RegistrationBody")),
                },
                "responses": {
                    "200": {"description": "updated", **instance_response},
                    "201": {"description": "created", **instance_response},
                    **error_responses(400, 401, 403, 409, 413, 422, 503),
                },
            },
            "delete": {
                "summary": "Deregister an instance",
                "operationId": "deregisterInstance",
                "security": SECURITY,
                "responses": {
                    "204": {"description": "deregistered", "headers": INDEX_HEADER},
                    **error_responses(400, 401, 403, 404, 409, 503),
                },
            },
        },
        "/v1/services/{service}/instances/{id}/heartbeat": {
            "parameters": [service, instance_id],
            "post": {
                "summary": "Renew the instance's lease",
                "operationId": "heartbeat",
                "security": SECURITY,
                "responses": {
                    "200": {"description": "renewed", **instance_response},
                    **error_responses(400, 401, 403, 404, 409),
                },
            },
        },
        "/v1/services": {
            "get": {
                "summary": "Every service with instance counts by health",
                "operationId": "listServices",
                "responses": {
                    "200": {
                        "description": "services",
                        "headers": INDEX_HEADER,
                        "content": json_content(
                            {
                                "type": "object",
                                "required": ["services"],
                                "properties": {
                                    "services": {"type": "array", "items": _service_summary()}
                                },
                            }
                        ),
                    },
                    **error_responses(401),
                },
            }
        },
        "/v1/services/{service}": {
            "parameters": [service],
            "get": {
                "summary": "A service's instances; a blocking query with index and wait",
                "operationId": "getService",
                "parameters": [
                    HEALTH_QUERY,
                    query_param(
                        "index",
                        "return once the service's index passes this value",
                        {"type": "integer", "minimum": 0},
                    ),
                    query_param(
                        "wait",
                        "longest wait with index (default 5m, at most 10m)",
                        {"type": "string", "examples": ["30s"]},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "instances of the service (empty when none)",
                        "headers": INDEX_HEADER,
                        "content": json_content(
                            {
                                "type": "object",
                                "required": ["service", "instances"],
                                "properties": {
                                    "service": {"type": "string"},
                                    "instances": {"type": "array", "items": ref("Instance")},
                                },
                            }
                        ),
                    },
                    **error_responses(400, 401),
                },
            },
        },
        "/v1/sd": {
            "get": {
                "summary": "Prometheus http_sd target groups, one per instance",
                "operationId": "httpSd",
                "parameters": [
                    query_param("service"),
                    HEALTH_QUERY,
                ],
                "responses": {
                    "200": {
                        "description": "target groups",
                        "content": json_content(
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["targets", "labels"],
                                    "properties": {
                                        "targets": {"type": "array", "items": {"type": "string"}},
                                        "labels": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            }
                        ),
                    },
                    **error_responses(400, 401),
                },
            }
        },
    }


def _service_summary() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "instances", "health", "tags"],
        "properties": {
            "name": {"type": "string"},
            "instances": {"type": "integer"},
            "health": {"type": "object", "additionalProperties": {"type": "integer"}},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
