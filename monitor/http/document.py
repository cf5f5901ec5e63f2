"""The OpenAPI 3.1 document of the daemon, generated from its route declarations (route.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .route import JSON, Route

REF = "#/components/schemas/{model}"
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
_PARAMETER = re.compile(r"\{(\w+)(?::[^}]*)?\}")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class Error(BaseModel):
    """Every error answer of the daemon (monitor/http/errors.py)."""

    error: ErrorBody


def openapi_document(
    routes: Iterable[Route],
    *,
    version: str,
) -> dict[str, Any]:
    """The document for `routes`, in order: each route's parameters, request body and
    answers, and each model it names once under components/schemas."""
    routes = list(routes)
    refs, schemas = _components(routes)
    paths: dict[str, Any] = {}
    never_shed = {route.path for route in routes if not route.shed}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    _add_daemon_wide_answers(paths, never_shed)
    return {
        "openapi": "3.1.0",
        "info": {"title": "hms-mgmt", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


Refs = Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]


def _components(routes: list[Route]) -> tuple[Refs, dict[str, Any]]:
    """Each model once, named by its class: replies as served, bodies as read."""
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None}
    for route in routes:
        if route.body is not None:
            wanted[(route.body, "validation")] = None
        for reply in route.replies:
            if reply.model is not None:
                wanted[(reply.model, "serialization")] = None
    refs, top = models_json_schema(list(wanted), ref_template=REF)
    return {key: ref for key, ref in refs.items()}, dict(top.get("$defs", {}))


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary, "operationId": route.operation_id}
    if route.audit is not None:  # the action its audit record names (DESIGN §3 Audit)
        operation["x-hms-audit"] = route.audit
    errors = set(route.errors)
    if route.scope is not None:
        operation["security"] = SECURITY
        errors |= {401, 403}
    parameters = _parameters(route)
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": {route.body_media: {"schema": refs[(route.body, "validation")]}},
        }
    responses: dict[str, Any] = {}
    for reply in route.replies:
        answer: dict[str, Any] = {"description": reply.description}
        if reply.headers:
            answer["headers"] = {
                name: {"description": description, "schema": {"type": "integer"}}
                for name, description in reply.headers.items()
            }
        if reply.body:
            if reply.model is not None:
                schema = refs[(reply.model, "serialization")]
            elif reply.schema is not None:
                schema = dict(reply.schema)
            else:
                schema = {"type": "object"} if reply.media == JSON else {"type": "string"}
            answer["content"] = {reply.media: {"schema": schema}}
        responses[str(reply.status)] = answer
    for status in sorted(errors):
        responses.setdefault(str(status), _error())
    operation["responses"] = responses
    return operation


def _parameters(route: Route) -> list[dict[str, Any]]:
    declared = _fields(route.match)
    parameters = [
        {"name": name, "in": "path", "required": True, **declared.get(name, _STRING)}
        for name in _PARAMETER.findall(route.path)
    ]
    for where, model in (("query", route.query), ("header", route.headers)):
        for name, described in _fields(model).items():
            parameters.append({"name": name, "in": where, "required": False, **described})
    return parameters


_STRING: dict[str, Any] = {"schema": {"type": "string"}}


def _fields(model: type[BaseModel] | None) -> dict[str, dict[str, Any]]:
    """Each field of `model` by its alias: its description and schema."""
    if model is None:
        return {}
    out = {}
    for name, schema in model.model_json_schema()["properties"].items():
        schema = {k: v for k, v in schema.items() if k not in ("title", "default")}
        description = schema.pop("description", None)
        out[name] = {"description": description} if description else {}
        out[name]["schema"] = schema
    return out


def _error() -> dict[str, Any]:
    return {
        "description": "error",
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_BODY_METHODS: tuple[Literal["put", "post", "patch"], ...] = ("put", "post", "patch")


def _add_daemon_wide_answers(paths: dict[str, Any], never_shed: set[str]) -> None:
    """Answers any operation can give, whatever its route: 503 when shedding load
    (monitor/http/shedding.py) or when a change cannot be stored; 408 and 413 where a body
    is read, 415 where a JSON one is."""
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            if path not in never_shed:
                responses.setdefault("503", _error())
            if method in _BODY_METHODS:
                responses.setdefault("408", _error())
                responses.setdefault("413", _error())
            if JSON in operation.get("requestBody", {}).get("content", {}):
                responses.setdefault("415", _error())  # a body that is surely not JSON
