"""HTTP routes for workflows, processes and events (DESIGN.md §3 Events and Workflows)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from monitor.http.auth import Authorizer
from monitor.http.body import parse_body, parse_json_object, read_body
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.sse import EventStream, Frames, MemoryTrim
from registry import parse_duration
from scheduler import EventBus
from scheduler.bus import DAEMON_TOPICS
from workflows.engine import Engine
from workflows.states import ProcessStatus
from workflows.stores.sqlite import STATUSES, Process

MAX_WAIT = 300.0
MAX_LIMIT = 1000
VISIBLE_TOPICS = 1024  # topic -> may the caller see it, remembered per stream
DEFAULT_SSE_BUFFER = 8 * 1024 * 1024
TOPIC = re.compile(r"[A-Za-z0-9._-]{1,128}")


ROUTER_PATH = "/{route:.+}"


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class WorkflowRoutes:
    def __init__(
        self,
        engine: Engine,
        bus: EventBus,
        auth: Authorizer,
        sse_buffer: int = DEFAULT_SSE_BUFFER,
    ) -> None:
        self.engine, self.bus, self.auth = engine, bus, auth
        # Bytes a stream may be behind before it is cut off; read by each new stream, so a
        # reload sets it for the streams opened after.
        self.sse_buffer = sse_buffer
        self._streams: set[asyncio.Task[Any]] = set()
        self._frames = Frames()
        self._trim = MemoryTrim()

    def routes(self) -> list[web.AbstractRouteDef]:
        routes: list[web.AbstractRouteDef] = [
            web.get("/v1/workflows", self.list_workflows),
            web.post("/v1/workflows/{name}", self.start),
            web.get("/v1/processes", self.list_processes),
            web.get("/v1/processes/{id}", self.get_process),
            web.post("/v1/processes/{id}/cancel", self.cancel),
            web.post("/v1/events/{topic}", self.publish),
            web.get("/v1/events", self.stream),
        ]
        return routes

    def router(self) -> web.AbstractRouteDef:
        """The seeds' request router: `POST {route}` of each workflow, looked up per request
        so routes added or changed by a config reload work at once. Added last, after every
        other route, so it only sees paths nothing else serves."""
        return web.route("*", ROUTER_PATH, self.route)

    async def route(self, request: web.Request) -> web.Response:
        path = request.path
        name = next((d.name for d in self.engine.definitions.values() if d.route == path), None)
        if name is None or request.method != "POST":
            # Answer as the router would have without this resource: 405 when some route
            # serves the path with other methods, else 404.
            allowed: set[str] = {"POST"} if name is not None else set()
            this = request.match_info.route.resource
            for resource in request.app.router.resources():
                if resource is not this:
                    allowed |= (await resource.resolve(request))[1]
            if allowed:
                raise web.HTTPMethodNotAllowed(request.method, allowed)
            raise web.HTTPNotFound()
        self.auth.require(request, "start", name)
        data = await parse_json_object(request, "the request body")
        return await self._start(request, name, data, request.headers.get("Idempotency-Key"))

    async def close_streams(self, app: web.Application) -> None:
        """on_shutdown: end open event streams, or shutdown would wait for them."""
        self._trim.cancel()
        self.end_streams()

    def end_streams(self) -> None:
        """End every open event stream now. A stream is authorized when it opens, so when
        tokens change (a reload) the open ones end: their clients reconnect with
        `Last-Event-ID` and pass auth again, missing nothing they may still see."""
        for task in list(self._streams):
            task.cancel()

    # -- workflows -----------------------------------------------------------------

    async def list_workflows(self, request: web.Request) -> web.Response:
        """Every definition with its processes counted by status."""
        out = []
        for definition in self.engine.definitions.values():
            counts = {s: self.engine.counts.get((definition.name, s), 0) for s in STATUSES}
            out.append(
                {
                    "name": definition.name,
                    "steps": [step.name for step in definition.steps],
                    "route": definition.route,
                    "trigger": definition.trigger,
                    "deadline_seconds": definition.deadline,
                    "counts": counts,
                }
            )
        return json_response({"workflows": out})

    async def start(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.auth.require(request, "start", name)
        if name not in self.engine.definitions:
            raise HttpError(404, f"no workflow named {name!r}")
        body = await parse_body(request, StartBody) if await read_body(request) else StartBody()
        return await self._start(request, name, body.input, body.idempotency_key)

    async def _start(
        self, request: web.Request, name: str, input_: dict[str, Any], key: str | None
    ) -> web.Response:
        wait = _wait(request)
        process, created = await self.engine.start(name, input_, key)
        if wait and await self.engine.wait(process.id, wait):
            return json_response(await self._full(process.id), status=200)
        return json_response(
            {"id": process.id, "status": process.status, "created": created}, status=202
        )

    # -- processes -----------------------------------------------------------------

    async def list_processes(self, request: web.Request) -> web.Response:
        """Newest first; `cursor` from the previous page's `next_cursor`."""
        query = request.query
        status = query.get("status")
        if status is not None and status not in STATUSES:
            raise HttpError(400, f"status must be one of {', '.join(STATUSES)}")
        limit = _int(query.get("limit", "100"), "limit", 1, MAX_LIMIT)
        cursor = _int(query["cursor"], "cursor", 1, 2**62) if "cursor" in query else None
        wanted = ProcessStatus(status) if status is not None else None
        page = await self.engine.store.page(query.get("workflow"), wanted, limit + 1, cursor)
        more = len(page) > limit
        page = page[:limit]
        return json_response(
            {
                "processes": [self._live(p).summary() for p in page],
                "next_cursor": str(page[-1].seq) if more else None,
            }
        )

    async def get_process(self, request: web.Request) -> web.Response:
        return json_response(await self._full(request.match_info["id"]))

    async def cancel(self, request: web.Request) -> web.Response:
        process_id = request.match_info["id"]
        stored = await self.engine.store.get(process_id)
        if stored is None:
            raise HttpError(404, f"no process {process_id!r}")
        self.auth.require(request, "cancel", stored[0].workflow)
        process = await self.engine.cancel(process_id)
        return json_response({"id": process.id, "status": process.status}, status=202)

    async def _full(self, process_id: str) -> dict[str, Any]:
        described = await self.engine.describe(process_id)
        if described is None:
            raise HttpError(404, f"no process {process_id!r}")
        return described

    def _live(self, process: Process) -> Process:
        return self.engine.live.get(process.id, process)

    # -- events --------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        if not _valid_topic(topic):
            raise HttpError(400, "topic must be 1-128 of A-Z a-z 0-9 . _ -")
        if topic.startswith(DAEMON_TOPICS):
            raise HttpError(403, f"topics under {', '.join(DAEMON_TOPICS)} are the daemon's own")
        self.auth.require(request, "publish", topic)
        data = await parse_json_object(request, "the event")
        seq = await self.engine.publish(topic, data, request.headers.get("Idempotency-Key"))
        return json_response({"id": seq, "topic": topic, "duplicate": seq is None}, status=202)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the stored events after `Last-Event-ID`, then every bus event
        whose topic matches `topics` (globs) and that the caller may see
        (Authorizer.may_subscribe). See workflows/sse.py."""
        visible: dict[str, bool] = {}

        def allowed(topic: str) -> bool:
            seen = visible.get(topic)
            if seen is None:
                if len(visible) > VISIBLE_TOPICS:
                    visible.clear()
                seen = visible[topic] = self.auth.may_subscribe(request, topic)
            return seen

        after = _last_event_id(request)
        patterns = [t.strip() for t in request.query.get("topics", "*").split(",") if t.strip()]
        patterns = patterns or ["*"]
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        task = asyncio.current_task()
        if task is not None:  # before the first await: from here on a reload ends the stream
            self._streams.add(task)
        try:
            writer = await response.prepare(request)
        except asyncio.CancelledError:  # ended (a reload, shutdown) before it began
            writer = None
        if writer is None or writer.transport is None:
            if task is not None:
                self._streams.discard(task)
            return response  # the client left already, or the stream was ended
        writer.transport.set_write_buffer_limits(high=0)  # drain() waits for the kernel
        stream = EventStream(
            response, writer, limit=self.sse_buffer, frames=self._frames, allowed=allowed
        )
        # Subscribe and note the position in one tick: replay ends where live begins.
        subscription = self.bus.subscribe(patterns, name="sse", sink=stream.offer)
        upto = self.bus.position
        try:
            await stream.send(b": connected\n\n")
            if after is not None:
                await stream.replay(patterns, after, upto, self.engine.store.events_after)
            await stream.run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._streams.discard(task)
            await subscription.close()
        if stream.cut_off:
            self._trim.soon()
        else:
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        return response


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, "Last-Event-ID must be an event id (an integer)") from None
    if value < 0:
        raise HttpError(400, "Last-Event-ID must not be negative")
    return value


def _valid_topic(topic: str) -> bool:
    return TOPIC.fullmatch(topic) is not None


def _wait(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw).total_seconds()
    except ValueError:
        raise HttpError(400, f"wait must be a duration like 30s, got {raw!r}") from None
    return min(seconds, MAX_WAIT)


def _int(raw: str, name: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be between {low} and {high}")
    return value
