"""Followers forward workflow requests to the leader, the one replica running the engine.

Until each process is claimed on its own, the workflow engine runs on the leader only
(monitor/cluster/leadership.py). A follower sends the leader every request the engine
answers: `/v1/workflows*`, `/v1/processes*`, `/v1/tasks*`, `POST /v1/events/{topic}` and each
workflow's `route:` (a POST that no other route serves). Method, path, query, body and
headers (Authorization too: the leader authorizes) go as they came, minus hop-by-hop
headers; the answer streams back with its status and headers, so long polls, `?wait=`
and event streams work through it. A forwarded request carries FORWARDED_BY and is never
forwarded again: a replica that no longer leads answers 503 `not_leader`, and the
client (or its retry) tries again once leadership settled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from ..cluster.leadership import Leadership
from .errors import Handler, error_response

FORWARDED_BY: Final = "X-Hms-Forwarded-By"
ENGINE_PREFIXES: Final = ("/v1/workflows", "/v1/processes", "/v1/tasks")
# RFC 9110 §7.6.1, and those the client library sets for the new connection itself.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
CONNECT_TIMEOUT = 2.0  # the leader's address answers at once or the leader is gone
RETRY_AFTER = "1"  # leadership settles within a lease; clients come back soon


class Forwarder:
    """The middleware (`middleware()`) and the client session it forwards with
    (`context`, an aiohttp cleanup context)."""

    def __init__(
        self, leadership: Leadership, replica: str, is_route: Callable[[web.Request], bool]
    ) -> None:
        self._leadership, self._replica, self._is_route = leadership, replica, is_route
        self._session: aiohttp.ClientSession | None = None
        # Forwards under way, by the leader they went to: when that one stops leading (a
        # paused or cut-off leader holds the connection open), they end now, with a 503
        # or a cut stream, instead of hanging for as long as it is gone.
        self._under_way: dict[str, set[asyncio.Timeout]] = {}
        leadership.on_leadership(self._leader_changed)

    def _leader_changed(self) -> None:
        now = asyncio.get_running_loop().time()
        for leader, timeouts in self._under_way.items():
            if leader != self._leadership.leader_address:
                for timeout in timeouts:
                    timeout.reschedule(now)

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        # No total timeout: a long poll or an event stream lasts as long as its client
        # wants. Bodies pass as they are: the client decompresses what the leader gzipped.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        try:
            yield
        finally:
            await self._session.close()

    def middleware(self) -> Middleware:
        @web.middleware
        async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self._leadership.is_leader or not self._for_engine(request):
                return await handler(request)
            if FORWARDED_BY in request.headers:  # sent here by a replica that thought we led
                return _refuse("this replica is not the leader", "not_leader")
            leader = self._leadership.leader_address
            if leader is None:
                return _refuse("no leader is known yet", "no_leader")
            return await self._forward(request, leader)

        return forward

    def _for_engine(self, request: web.Request) -> bool:
        path = request.path
        if any(path == p or path.startswith(p + "/") for p in ENGINE_PREFIXES):
            return True
        if path.startswith("/v1/events/"):
            return request.method == "POST"  # publishing; the stream is served here
        return request.method == "POST" and self._is_route(request)

    async def _forward(self, request: web.Request, leader: str) -> web.StreamResponse:
        assert self._session is not None, "Forwarder.context is not installed"
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        headers[FORWARDED_BY] = self._replica
        if request.remote:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
        body = await request.read() if request.body_exists else None
        url = leader.rstrip("/") + request.rel_url.raw_path_qs
        response: web.StreamResponse | None = None
        under_way = self._under_way.setdefault(leader, set())
        try:
            async with (
                asyncio.timeout(None) as timeout,
                self._track(under_way, timeout),
                self._session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                ) as upstream,
            ):
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP or key.lower() == "content-length":
                        response.headers.add(key, value)  # the body passes as it came
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if response is not None and response.prepared:  # the leader died mid-answer
                response.force_close()  # the client sees a cut stream, never half a body
                return response
            return _refuse(f"the leader at {leader} is unreachable: {exc}", "leader_unreachable")

    @contextlib.asynccontextmanager
    async def _track(
        self, under_way: set[asyncio.Timeout], deadline: asyncio.Timeout
    ) -> AsyncIterator[None]:
        under_way.add(deadline)
        try:
            yield
        finally:
            under_way.discard(deadline)


def _refuse(message: str, code: str) -> web.Response:
    response = error_response(503, message, code=code)
    response.headers["Retry-After"] = RETRY_AFTER
    return response
