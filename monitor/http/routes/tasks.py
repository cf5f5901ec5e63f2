"""HTTP routes of the task queues (DESIGN.md §3 Task queues): workers poll for tasks and
answer them by delivery id. The queues themselves are workflows/tasks.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from monitor.http.auth import GRANT, Authorizer
from monitor.http.body import parse_body, read_body
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.names import NAME_PATTERN
from registry import Catalog, RegistryError, StoreUnavailable, parse_duration
from workflows.abc import TaskRecord
from workflows.tasks import StaleDelivery, TaskQueues, UnknownDelivery, delivery_json

MAX_WAIT = 60.0  # a longer wait is cut to this: proxies and clients time out past a minute
DEFAULT_WAIT = 30.0
MAX_TASKS = 100

table = RouteTable()


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(pattern=NAME_PATTERN, description="a delivery of this queue")]
    output: Any = Field(default=None, description="the step's output (JSON)")


class PollBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: Annotated[str, Field(pattern=NAME_PATTERN, description="the queue to take tasks of")]
    worker: Annotated[
        str | None,
        Field(
            default=None,
            pattern=NAME_PATTERN,
            description="the worker's id; renews its registration as instance of <queue>",
        ),
    ] = None
    wait: str | float = Field(
        default="30s",
        description="answer with no tasks after this: a duration (30s) or seconds; at most 60s",
    )
    max: int = Field(default=10, ge=1, le=MAX_TASKS, description="at most this many tasks")
    complete: list[Completion] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        description="deliveries answered with their output, as POST /v1/tasks/{id}/complete "
        "would, each committed before the poll answers: a worker saves a request per task",
    )

    @field_validator("wait")
    @classmethod
    def _duration(cls, value: str | float) -> str | float:
        if _seconds(value) < 0:  # a bad duration raises ValueError too: 422 either way
            raise ValueError("wait must not be negative")
        return value

    @property
    def seconds(self) -> float:
        return min(_seconds(self.wait), MAX_WAIT)


def _connected(request: web.Request) -> Callable[[], bool]:
    """Whether the request's client is still connected: aiohttp does not cancel a handler
    whose client went away, so a long poll asks before it takes a task for its worker."""

    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return alive


def _seconds(wait: str | float) -> float:
    if isinstance(wait, str):
        return parse_duration(wait).total_seconds()
    return float(wait)


class TaskDelivery(BaseModel):
    id: str = Field(description="this delivery; answer the task under it")
    process: str
    workflow: str
    step: str
    task: str = Field(description="the task name: a step's `task`, or its `compensate.task`")
    input: dict[str, Any]
    steps: dict[str, Any] = Field(description="the outputs of the steps done so far")
    attempt: int
    idempotency_key: str = Field(description="`<process>/<step>` (`.compensate` appended)")
    deadline: float = Field(description="the lease's end, epoch seconds; heartbeats renew it")
    lease: float = Field(description="the lease's length, seconds: heartbeat within it")
    due_at: float | None = Field(
        default=None,
        description="when the task was committed and became due, epoch seconds (pickup latency)",
    )


class CarriedAnswer(BaseModel):
    id: str
    state: str | None = Field(default=None, description="done: the completion is committed")
    error: dict[str, Any] | None = Field(
        default=None,
        description="as a complete's error: not_found (404), conflict (409), or unavailable "
        "(503: not made, send it again)",
    )


class TaskBatch(BaseModel):
    tasks: list[TaskDelivery]
    completed: list[CarriedAnswer] | None = Field(
        default=None, description="the outcome of each `complete` the poll carried, if any"
    )


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: Any = Field(default=None, description="the step's output (JSON)")


class FailBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str = Field(min_length=1, max_length=4096, description="why it failed")
    retryable: bool = Field(default=True, description="false: no further attempt")


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskAnswered(BaseModel):
    id: str
    state: str = Field(description="done or failed")


class TaskLease(BaseModel):
    deadline: float = Field(description="the lease's new end, epoch seconds")
    lease: float = Field(description="the lease's length, seconds: heartbeat within it")


class DeliveryId(BaseModel):
    id: Annotated[str, Field(pattern=NAME_PATTERN, description="delivery id")]


ANSWER_ERRORS = (400, 401, 403, 404, 409, 422)


class TaskRoutes:
    def __init__(self, tasks: TaskQueues | None, catalog: Catalog, auth: Authorizer) -> None:
        self.tasks, self.catalog, self.auth = tasks, catalog, auth

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.post(
        "/v1/tasks/poll",
        operation_id="pollTasks",
        summary="Take due tasks of a queue: a long poll",
        body=PollBody,
        replies=(Reply(status=200, description="claimed tasks, maybe none", model=TaskBatch),),
        errors=(400, 401, 403, 422),
        scope="work",
    )
    async def poll(self, request: web.Request) -> web.Response:
        self._may_work(request)
        body = await parse_body(request, PollBody)
        self.auth.require(request, "work", body.queue)
        if body.worker is not None:
            # The SDK's worker registers as an instance of its queue: its polls renew it.
            with contextlib.suppress(RegistryError):
                self.catalog.heartbeat(body.queue, body.worker)
        alive = _connected(request)
        queues = self._queues()
        # Together, so the completions and the claim share the writer's next commit; the
        # answer (2xx) waits for both.
        carried = [asyncio.ensure_future(self._carried(body.queue, c)) for c in body.complete]
        try:
            claimed = await queues.poll(body.queue, body.worker, body.seconds, body.max, alive)
        finally:  # never cut short: an answer written must resolve its process's wait
            answers = await asyncio.gather(*carried)
        if claimed and not alive():  # the worker went away: the tasks are due again, now
            await queues.release(claimed)
            claimed = []
        answer: dict[str, Any] = {"tasks": [delivery_json(r, queues.due_at(r)) for r in claimed]}
        if body.complete:
            answer["completed"] = answers
        return json_response(answer)

    async def _carried(self, queue: str, completion: Completion) -> dict[str, Any]:
        """A completion a poll carries: answered as its own POST would be (a delivery of
        another queue is unknown here: the poll's scope covers only its own queue)."""
        delivery, queues = completion.id, self._queues()
        try:
            if await queues.queue_of(delivery) != queue:
                raise UnknownDelivery(f"no task delivery {delivery!r} on queue {queue!r}")
            record = await queues.complete(delivery, completion.output)
        except UnknownDelivery as exc:
            return {"id": delivery, "error": {"code": "not_found", "message": str(exc)}}
        except StaleDelivery as exc:
            return {"id": delivery, "error": {"code": "conflict", "message": str(exc)}}
        except StoreUnavailable as exc:  # not made: the worker sends it again
            return {"id": delivery, "error": {"code": "unavailable", "message": str(exc)}}
        return {"id": delivery, "state": record.state}

    @table.post(
        "/v1/tasks/{id}/complete",
        operation_id="completeTask",
        summary="Answer a delivery with the step's output",
        match=DeliveryId,
        body=CompleteBody,
        replies=(Reply(status=200, description="accepted", model=TaskAnswered),),
        errors=ANSWER_ERRORS,
        scope="work",
    )
    async def complete(self, request: web.Request) -> web.Response:
        delivery = await self._authorized(request)
        body = await parse_body(request, CompleteBody)
        record = await self._answer(self._queues().complete(delivery, body.output))
        return json_response({"id": delivery, "state": record.state})

    @table.post(
        "/v1/tasks/{id}/fail",
        operation_id="failTask",
        summary="Answer a delivery with a failure",
        match=DeliveryId,
        body=FailBody,
        replies=(Reply(status=200, description="accepted", model=TaskAnswered),),
        errors=ANSWER_ERRORS,
        scope="work",
    )
    async def fail(self, request: web.Request) -> web.Response:
        delivery = await self._authorized(request)
        body = await parse_body(request, FailBody)
        record = await self._answer(self._queues().fail(delivery, body.error, body.retryable))
        return json_response({"id": delivery, "state": record.state})

    @table.post(
        "/v1/tasks/{id}/heartbeat",
        operation_id="heartbeatTask",
        summary="Renew a delivery's lease",
        match=DeliveryId,
        body=HeartbeatBody,
        body_required=False,
        replies=(Reply(status=200, description="renewed", model=TaskLease),),
        errors=ANSWER_ERRORS,
        scope="work",
    )
    async def heartbeat(self, request: web.Request) -> web.Response:
        delivery = await self._authorized(request)
        if await read_body(request):
            await parse_body(request, HeartbeatBody)
        record = await self._answer(self._queues().heartbeat(delivery))
        return json_response({"deadline": record.lease_until, "lease": record.lease})

    def _queues(self) -> TaskQueues:
        if self.tasks is None:
            raise HttpError(503, "task queues are not served", code="unavailable")
        return self.tasks

    def _may_work(self, request: web.Request) -> None:
        """401 without a token, 403 for a token with no `work:` scope at all: answered
        before the body or the delivery is looked at; the queue's own scope after."""
        if not self.auth.enabled:
            return
        grant = request.get(GRANT)
        if grant is None:
            raise HttpError(401, "a bearer token is required", code="unauthorized")
        if not any(scope == "*" or scope.startswith("work:") for scope in grant.scopes):
            raise HttpError(403, "token has no work:<queue> scope", code="forbidden")

    async def _authorized(self, request: web.Request) -> str:
        """The delivery id, once the token may work the queue of its task (401 before 404,
        so ids are not confirmed to whoever has no token)."""
        delivery = request.match_info["id"]
        self._may_work(request)
        queue = await self._queues().queue_of(delivery)
        if queue is None:
            raise HttpError(404, f"no task delivery {delivery!r}")
        self.auth.require(request, "work", queue)
        return delivery

    @staticmethod
    async def _answer(answer: Awaitable[TaskRecord]) -> TaskRecord:
        try:
            record = await answer
        except UnknownDelivery as exc:
            raise HttpError(404, str(exc)) from None
        except StaleDelivery as exc:
            raise HttpError(409, str(exc), code="conflict") from None
        return record
