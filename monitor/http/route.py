"""Each route declared once: method, path, models and answers, beside its handler.

The router gets the handler itself (a plain bound method, nothing wrapped around it, so
the hot paths pay nothing) and /openapi.json is generated from the same declaration
(monitor/http/document.py), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel

from monitor.http.audit import audited

JSON = "application/json"
Method = Literal["GET", "PUT", "POST", "DELETE"]
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One successful answer of a route."""

    status: int
    description: str = "OK"
    # The schema's name is the model's class name. None: a JSON body is not described
    # further than `schema`, any other media is a string, and `body=False` means no body.
    model: type[BaseModel] | None = None
    schema: Mapping[str, Any] | None = None
    media: str = JSON
    body: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)  # header name -> description


@dataclass(frozen=True, kw_only=True)
class Route:
    method: Method
    path: str  # an aiohttp pattern: each {x} is a path parameter
    operation_id: str
    summary: str
    replies: tuple[Reply, ...]
    errors: tuple[int, ...] = ()  # statuses answered in the Error shape
    body: type[BaseModel] | None = None  # the request body
    body_media: str = JSON
    body_required: bool = True
    match: type[BaseModel] | None = None  # path parameters, one per field; else plain strings
    query: type[BaseModel] | None = None  # one optional query parameter per field
    headers: type[BaseModel] | None = None  # one optional header per field (by alias)
    scope: str | None = None  # the Authorizer verb: bearer security, 401 and 403
    shed: bool = True  # False: served while the daemon sheds load (shedding.NEVER_SHED)
    # The audit action of a change (`instance.register`): who made it is recorded in its
    # transaction (http/audit.py). None on reads, and on the changes DESIGN §3 leaves out.
    audit: str | None = None
    audit_target: str | None = None  # default: the path parameters joined by `/`


_ROUTE_DEFS: dict[str, Callable[..., web.RouteDef]] = {
    "GET": web.get,  # with HEAD, as aiohttp adds it for every GET
    "PUT": web.put,
    "POST": web.post,
    "DELETE": web.delete,
}


class RouteTable:
    """The routes of one routes class, declared by decorating its handler methods."""

    def __init__(self) -> None:
        self._declared: list[tuple[str, Route]] = []

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(route for _, route in self._declared)

    def route(self, method: Method, path: str, **route: Any) -> Callable[[H], H]:
        def declare(handler: H) -> H:
            self._declared.append((handler.__name__, Route(method=method, path=path, **route)))
            return handler

        return declare

    def get(self, path: str, **route: Any) -> Callable[[H], H]:
        return self.route("GET", path, **route)

    def put(self, path: str, **route: Any) -> Callable[[H], H]:
        return self.route("PUT", path, **route)

    def post(self, path: str, **route: Any) -> Callable[[H], H]:
        return self.route("POST", path, **route)

    def delete(self, path: str, **route: Any) -> Callable[[H], H]:
        return self.route("DELETE", path, **route)

    def bind(self, owner: object) -> list[tuple[Route, web.RouteDef]]:
        """Each route with its router entry, the handler being `owner`'s bound method
        (wrapped to record the change, for an audited route)."""
        bound = []
        for name, route in self._declared:
            handler = getattr(owner, name)
            if route.audit is not None:
                ok = route.replies[0].status
                handler = audited(route.audit, ok, route.audit_target, handler)
            bound.append((route, _ROUTE_DEFS[route.method](route.path, handler)))
        return bound

    def route_defs(self, owner: object) -> list[web.RouteDef]:
        return [definition for _, definition in self.bind(owner)]
