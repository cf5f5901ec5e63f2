"""Real HTTP services for tests: one for workflow steps to call, and a webhook receiver.

The step service records every request (path, body, Idempotency-Key) so tests can check
what the engine sent, and can be told to fail: `fail[path] = [503, 503]`
answers the next two calls to `path` with 503, then succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class Recorder:
    """A threaded HTTP server (for tests and benches without an event loop of their own)
    that answers every GET and POST with 200 `{"ok": true}` and records each request:
    `requests` holds (path, Idempotency-Key, monotonic time of arrival)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key", "")
                requests.append((self.path, key, time.monotonic()))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        return sum(1 for seen, _, _ in self.requests if seen == path)

    def paths(self) -> set[str]:
        return {path for path, _, _ in self.requests}

    def keys(self, path: str) -> list[str]:
        return [key for seen, key, _ in self.requests if seen == path]

    def times(self, path: str) -> list[float]:
        return [at for seen, _, at in self.requests if seen == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
