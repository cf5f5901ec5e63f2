"""Real HTTP services for tests: one for workflow steps to call, and a webhook receiver.

The step service records every request (path, body, Idempotency-Key) so tests can check
what the engine sent, and can be told to fail: `fail[path] = [503, 503]`
answers the next two calls to `path` with 503, then succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Calls:
    seen: list[tuple[str, str, Any, str | None]] = field(default_factory=list)
    fail: dict[str, list[int]] = field(default_factory=dict)
    fail_body: dict[str, str] = field(default_factory=dict)  # a planned failure's text body
    hang: set[str] = field(default_factory=set)

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.seen]

    def keys(self, path: str) -> list[str | None]:
        return [key for _, p, _, key in self.seen if p == path]


def service_app(calls: Calls) -> web.Application:
    payments = itertools.count(1)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        calls.seen.append(
            (request.method, request.path, body, request.headers.get("Idempotency-Key"))
        )
        if request.path in calls.hang:
            await asyncio.sleep(3600)
        planned = calls.fail.get(request.path)
        if planned:
            status = planned.pop(0)
            if request.path in calls.fail_body:
                return web.Response(text=calls.fail_body[request.path], status=status)
            return web.json_response({"error": "planned failure"}, status=status)
        response: web.StreamResponse = await handler(request)
        return response

    async def validate(request: web.Request) -> web.Response:
        return web.json_response({"valid": True})

    async def transfer(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"payment_id": f"pay-{next(payments)}", "amount": body["amount"]})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"payment_id": request.match_info["id"], "state": "settled"})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[record])
    app.router.add_post("/validate", validate)
    app.router.add_post("/transfers", transfer)
    app.router.add_get("/transfers/{id}", status)
    app.router.add_post("/transfers/{id}/cancel", ok)
    app.router.add_post("/{name}", ok)
    return app


@dataclass
class Receiver:
    """A webhook receiver that answers with the queued statuses, then 200."""

    server: TestServer
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


async def start_receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on 127.0.0.1 for as long as the caller iterates."""
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    state = Receiver(server)

    async def hook(request: web.Request) -> web.Response:
        state.received.append((dict(request.headers), await request.read()))
        status = state.statuses.pop(0) if state.statuses else 200
        return web.Response(status=status)

    app.router.add_post("/hook", hook)
    await server.start_server()
    yield state
    await server.close()
