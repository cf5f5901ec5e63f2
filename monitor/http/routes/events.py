"""The event routes: publish an event, and the bus as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, RootModel

from monitor.http.audit import actor
from monitor.http.auth import Authorizer
from monitor.http.body import parse_json_object
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import TopicName
from monitor.http.sse import EventStream, Frames, MemoryTrim
from scheduler import EventBus
from scheduler.bus import DAEMON_TOPICS
from workflows.engine import Engine

VISIBLE_TOPICS = 1024  # topic -> may the caller see it, remembered per stream
DEFAULT_SSE_BUFFER = 8 * 1024 * 1024
TOPIC = re.compile(r"[A-Za-z0-9._-]{1,128}")
table = RouteTable()


class EventBody(RootModel[dict[str, Any]]):
    """An event's data: any JSON object (an empty body is {})."""


class Published(BaseModel):
    id: int | None = None
    topic: str | None = None
    duplicate: bool | None = None


class StreamQuery(BaseModel):
    topics: str = Field(default="", description="comma-separated topic globs, default *")


class StreamHeaders(BaseModel):
    last_event_id: int = Field(
        default=0,
        ge=0,
        alias="Last-Event-ID",
        description="first send the stored events after this id",
    )


class EventRoutes:
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

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

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

    @table.post(
        "/v1/events/{topic}",
        operation_id="publishEvent",
        summary="Publish an event (stored; starts triggered workflows)",
        match=TopicName,
        body=EventBody,
        body_required=False,
        replies=(Reply(status=202, description="published", model=Published),),
        errors=(400, 401, 403, 422),
    )
    async def publish(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        if not _valid_topic(topic):
            raise HttpError(400, "topic must be 1-128 of A-Z a-z 0-9 . _ -")
        if topic.startswith(DAEMON_TOPICS):
            raise HttpError(403, f"topics under {', '.join(DAEMON_TOPICS)} are the daemon's own")
        self.auth.require(request, "publish", topic)
        data = await parse_json_object(request, "the event")
        key = request.headers.get("Idempotency-Key")
        seq = await self.engine.publish(topic, data, key, by=actor(request))
        return json_response({"id": seq, "topic": topic, "duplicate": seq is None}, status=202)

    @table.get(
        "/v1/events",
        operation_id="streamEvents",
        summary="Server-Sent Events of the bus",
        query=StreamQuery,
        headers=StreamHeaders,
        replies=(
            Reply(
                status=200,
                description="an event stream; each `data:` is {id, topic, time, data}, with "
                "`actor` (who published it) beside `data` for an event published to the store",
                media="text/event-stream",
            ),
        ),
        errors=(400, 401),
    )
    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the stored events after `Last-Event-ID`, then every bus event
        whose topic matches `topics` (globs) and that the caller may see
        (Authorizer.may_subscribe). See monitor/http/sse.py."""
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
            response,
            writer,
            limit=self.sse_buffer,
            frames=self._frames,
            allowed=allowed,
            after=after or 0,
        )
        # Subscribe and note the position in one tick: replay ends where live begins.
        subscription = self.bus.subscribe(patterns, name="sse", sink=stream.offer)
        upto = self.bus.position
        try:
            await stream.send(b": connected\n\n")
            if after is not None and after > upto:
                # Seen on a replica further on: skipped when the relay brings them here, but
                # only as far as the store goes (a client of a database since replaced).
                stream.after = min(after, await self.engine.store.last_event_seq())
            elif after is not None:
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
