"""HTTP routes for workflows and processes, and the request router serving each workflow's
`route:` (DESIGN.md §3 Workflows). Events are in events.py."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel

from monitor.http.audit import actor, answered, audited
from monitor.http.auth import GRANT, Authorizer, Grant
from monitor.http.body import parse_body, parse_json_object, query_int, read_body
from monitor.http.errors import HttpError
from monitor.http.responses import json_response
from monitor.http.route import Reply, Route, RouteTable
from monitor.http.routes.events import DEFAULT_SSE_BUFFER, EventRoutes
from monitor.http.routes.names import SignalKey, WorkflowName
from registry import parse_duration
from registry.model import is_valid_name
from scheduler import EventBus
from workflows import Definition, records
from workflows.engine import Engine
from workflows.errors import InvalidDefinition
from workflows.states import STATUSES, ProcessStatus

MAX_WAIT = 300.0
HIDDEN = "(hidden)"
MAX_LIMIT = 1000


ROUTER_PATH = "/{route:.+}"
table = RouteTable()


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class SignalData(RootModel[dict[str, Any]]):
    """A signal's JSON: the output of the step that takes it (empty body: {})."""


class WorkflowInput(RootModel[dict[str, Any]]):
    """A workflow `route:`'s body: the process's input, any JSON object."""


class WorkflowSummary(BaseModel):
    name: str
    version: int | None = None
    source: Literal["config", "api"] | None = None
    steps: list[str] | None = None
    route: str | None = None
    trigger: Any = None
    deadline_seconds: float | None = None
    counts: dict[str, int] | None = None


class WorkflowDefinition(BaseModel):
    name: str
    version: int
    source: Literal["config", "api"]
    definition: dict[str, Any] = Field(description="the config.yaml entry's schema, as JSON")


class DefinitionBody(RootModel[dict[str, Any]]):
    """A config.yaml workflow entry as JSON (`name` may be left out)."""


class Workflows(BaseModel):
    workflows: list[WorkflowSummary] | None = None


class Started(BaseModel):
    id: str
    status: str
    created: bool | None = Field(default=None, description="false: the idempotency key's process")


class ProcessError(BaseModel):
    """Why a process failed: the step, the reason, and what the service answered."""

    step: str | None = None
    message: str
    status: int | None = Field(default=None, description="the failing answer's HTTP status")
    body: str | None = Field(default=None, description="its body's first KiB, as text")


class ProcessSummary(BaseModel):
    id: str
    workflow: str
    status: str
    created_at: float
    updated_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    deadline_missed: bool | None = None
    error: ProcessError | None = None
    workflow_version: int | None = Field(
        default=None, description="the definition version the process runs"
    )
    started_by: str | None = Field(
        default=None,
        description="who started it: a token's name (`anonymous` when auth is off), "
        "`schedule`, or `event:<topic>` for an event's trigger; null on processes stored "
        "before it was kept",
    )
    cancelled_by: str | None = Field(
        default=None, description="who cancelled it through the API (a token's name)"
    )


class WaitingFor(BaseModel):
    """While waiting: kind, until (epoch seconds, null: no limit) and detail."""

    kind: Literal["delay", "retry", "signal", "event", "resource", "task"] | None = None
    until: float | None = None
    detail: str | None = None


class ProcessStep(BaseModel):
    name: str | None = None
    state: Literal["pending", "running", "waiting", "completed", "failed", "compensated"] | None = (
        None
    )


class Process(ProcessSummary):
    idempotency_key: str | None = None
    current_step: str | None = None
    waiting_for: WaitingFor | None = None
    steps: list[ProcessStep] | None = Field(
        default=None, description="every step of the definition, those not yet run included"
    )
    input: dict[str, Any]
    outputs: dict[str, Any]
    output: Any = Field(
        default=None,
        description="the result: the `output:` template (so far, while running), else every "
        "step's output; null when the process failed",
    )
    history: list[dict[str, Any]] = Field(
        description="every attempt, oldest first; a `wait_for: {signal}` step's names who "
        "sent the signal it took (`signalled_by`)"
    )


class ProcessPage(BaseModel):
    processes: list[ProcessSummary] | None = None
    next_cursor: str | None = None


class StartQuery(BaseModel):
    wait: str = Field(
        default="",
        description="wait up to this long (e.g. 30s, at most 5m) for the process to end "
        "or do its `respond_after` step",
    )


class ProcessQuery(BaseModel):
    workflow: str = Field(default="", description="only this workflow")
    status: str = Field(default="", description="only this status")
    limit: str = Field(default="", description="1-1000, default 100")
    cursor: str = Field(default="", description="next_cursor of the previous page")


# 202 first: the status a start's audit record keeps (it is written when the process is
# created, before any `wait`).
START_REPLIES = (
    Reply(status=202, description="started (or running)", model=Started),
    Reply(
        status=200,
        description="ended, or did its `respond_after` step, within `wait`",
        model=Process,
    ),
)
START_ERRORS = (400, 401, 403, 404, 422)


def workflow_route(path: str, name: str) -> Route:
    """A workflow's `route:` (config.yaml), served by the request router: declared from the
    live config each time the document is built, so a reload shows at once."""
    return Route(
        method="POST",
        path=path,
        operation_id=f"route_{name}",
        summary=f"Start {name} with the body as input",
        query=StartQuery,
        body=WorkflowInput,
        body_required=False,
        replies=START_REPLIES,
        errors=START_ERRORS,
        audit="process.start",
        audit_target=name,
    )


class WorkflowRoutes:
    def __init__(
        self,
        engine: Engine,
        bus: EventBus,
        auth: Authorizer,
        sse_buffer: int = DEFAULT_SSE_BUFFER,
    ) -> None:
        self.engine, self.auth = engine, auth
        # The event routes (publish, stream) are theirs; kept here so the app sees one part.
        self.events = EventRoutes(engine, bus, auth, sse_buffer)

    def routes(self) -> list[web.RouteDef]:
        return [*table.route_defs(self), *self.events.routes()]

    def router(self) -> web.AbstractRouteDef:
        """The seeds' request router: `POST {route}` of each workflow, looked up per request
        so routes added or changed by a config reload work at once. Added last, after every
        other route, so it only sees paths nothing else serves."""
        return web.route("*", ROUTER_PATH, self.route)

    async def route(self, request: web.Request) -> web.StreamResponse:
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

        async def start(request: web.Request) -> web.Response:
            data = await parse_json_object(request, "the request body")
            key = request.headers.get("Idempotency-Key")
            return await self._start(request, name, data, key)

        return await audited("process.start", 202, name, start)(request)

    @property
    def sse_buffer(self) -> int:
        return self.events.sse_buffer

    @sse_buffer.setter
    def sse_buffer(self, size: int) -> None:
        self.events.sse_buffer = size

    async def close_streams(self, app: web.Application) -> None:
        await self.events.close_streams(app)

    def end_streams(self) -> None:
        self.events.end_streams()

    # -- workflows -----------------------------------------------------------------

    @table.get(
        "/v1/workflows",
        operation_id="listWorkflows",
        summary="Workflow definitions with their processes counted by status",
        replies=(Reply(status=200, description="definitions", model=Workflows),),
        errors=(401,),
    )
    async def list_workflows(self, request: web.Request) -> web.Response:
        """Every definition with its processes counted by status."""
        out = []
        for definition in self.engine.definitions.values():
            counts = {s: self.engine.counts.get((definition.name, s), 0) for s in STATUSES}
            out.append(
                {
                    "name": definition.name,
                    "version": definition.version,
                    "source": definition.source,
                    "steps": [step.name for step in definition.steps],
                    "route": definition.route,
                    "trigger": _trigger(definition),
                    "deadline_seconds": definition.deadline,
                    "counts": counts,
                }
            )
        return json_response({"workflows": out})

    @table.get(
        "/v1/workflows/{name}",
        operation_id="getWorkflow",
        summary="A workflow definition: its current version, source and JSON",
        match=WorkflowName,
        replies=(Reply(status=200, description="the definition", model=WorkflowDefinition),),
        errors=(401, 404),
    )
    async def get_workflow(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        definition = self.engine.definitions.get(name)
        if definition is None:
            raise HttpError(404, f"no workflow named {name!r}")
        return json_response(_definition(definition))

    @table.put(
        "/v1/workflows/{name}",
        operation_id="defineWorkflow",
        summary="Define or replace a workflow (versioned; running processes keep theirs)",
        match=WorkflowName,
        body=DefinitionBody,
        replies=(
            Reply(status=201, description="defined", model=WorkflowDefinition),
            Reply(status=200, description="replaced, or unchanged", model=WorkflowDefinition),
        ),
        errors=(400, 401, 403, 409, 422),
        audit="workflow.define",
    )
    async def define(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not is_valid_name(name):
            raise HttpError(400, "a workflow name is 1-128 of A-Z a-z 0-9 . _ -")
        self.auth.require(request, "define", name)
        data = await parse_json_object(request, "a workflow definition")
        if data.setdefault("name", name) != name:
            problem = {"path": "name", "message": f"must be {name!r}, the name in the path"}
            raise HttpError(422, "the definition does not validate", details=[problem])
        try:
            parsed = self.engine.parse(data)
            definition, created = await self.engine.define(  # checks its route too
                parsed, on_write=lambda created: answered(request, 201 if created else 200)
            )
        except InvalidDefinition as exc:
            problems = [{"path": path, "message": message} for path, message in exc.problems]
            raise HttpError(
                422, f"the definition does not validate: {exc}", details=problems
            ) from None
        return json_response(_definition(definition), status=201 if created else 200)

    @table.post(
        "/v1/workflows/{name}",
        operation_id="startWorkflow",
        summary="Start a process",
        match=WorkflowName,
        query=StartQuery,
        body=StartBody,
        body_required=False,
        replies=START_REPLIES,
        errors=START_ERRORS,
        audit="process.start",
    )
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
        process, created = await self.engine.start(name, input_, key, by=actor(request))
        if wait and await self.engine.wait(process.id, wait):
            return json_response(await self._full(process.id), status=200)
        return json_response(
            {"id": process.id, "status": process.status, "created": created}, status=202
        )

    # -- processes -----------------------------------------------------------------

    @table.get(
        "/v1/processes",
        operation_id="listProcesses",
        summary="Processes, newest first, with filters and cursor paging",
        query=ProcessQuery,
        replies=(Reply(status=200, description="a page", model=ProcessPage),),
        errors=(400, 401),
    )
    async def list_processes(self, request: web.Request) -> web.Response:
        """Newest first; `cursor` from the previous page's `next_cursor`."""
        query = request.query
        status = query.get("status")
        if status is not None and status not in STATUSES:
            raise HttpError(400, f"status must be one of {', '.join(STATUSES)}")
        limit = query_int(query.get("limit", "100"), "limit", 1, MAX_LIMIT)
        cursor = query_int(query["cursor"], "cursor", 1, 2**62) if "cursor" in query else None
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

    @table.get(
        "/v1/processes/{id}",
        operation_id="getProcess",
        summary="A process: status, input, outputs and every attempt",
        replies=(Reply(status=200, description="the process", model=Process),),
        errors=(401, 404),
    )
    async def get_process(self, request: web.Request) -> web.Response:
        return json_response(await self._full(request.match_info["id"]))

    @table.post(
        "/v1/processes/{id}/cancel",
        operation_id="cancelProcess",
        summary="Cancel: stop and compensate the done steps",
        replies=(Reply(status=202, description="cancelling", model=Started),),
        errors=(401, 403, 404, 409),
        audit="process.cancel",
    )
    async def cancel(self, request: web.Request) -> web.Response:
        process_id = request.match_info["id"]
        await self._scoped(request, "cancel", process_id)
        process = await self.engine.cancel(process_id, by=actor(request))
        return json_response({"id": process.id, "status": process.status}, status=202)

    @table.post(
        "/v1/processes/{id}/signals/{name}",
        operation_id="signalProcess",
        summary="Send a signal: JSON a `wait_for: {signal}` step takes (kept until then)",
        match=SignalKey,
        body=SignalData,
        body_required=False,
        replies=(Reply(status=202, description="kept for the process", model=Started),),
        errors=(400, 401, 403, 404, 409, 422),
        audit="process.signal",
    )
    async def signal(self, request: web.Request) -> web.Response:
        process_id, name = request.match_info["id"], request.match_info["name"]
        if not is_valid_name(name):
            raise HttpError(400, "a signal name is 1-128 of A-Z a-z 0-9 . _ -")
        await self._scoped(request, "signal", process_id)
        data = await parse_json_object(request, "a signal")
        process = await self.engine.signal(process_id, name, data, by=actor(request))
        return json_response({"id": process.id, "status": process.status}, status=202)

    async def _scoped(self, request: web.Request, verb: str, process_id: str) -> None:
        """403 when the token has no `verb` scope at all (whatever the id); 404 when the
        process is unknown or its workflow is not in the token's scopes: the two answer
        alike, as a 403 would tell which ids exist."""
        if not self._may(request, verb, None):
            raise HttpError(403, f"token has no scope for {verb}:<workflow>", code="forbidden")
        stored = await self.engine.store.get(process_id)
        if stored is None or not self._may(request, verb, stored[0].workflow):
            raise HttpError(404, f"no process {process_id!r}")

    def _may(self, request: web.Request, verb: str, subject: str | None) -> bool:
        """Whether the caller's token has a scope for `verb` on `subject`, or on anything
        when `subject` is None (auth off: yes)."""
        grant: Grant | None = request.get(GRANT)
        if not self.auth.enabled:
            return True
        if grant is None:
            return False
        if subject is not None:
            return grant.allows(verb, subject)
        return any(s == "*" or s.partition(":")[0] == verb for s in grant.scopes)

    async def _full(self, process_id: str) -> dict[str, Any]:
        described = await self.engine.describe(process_id)
        if described is None:
            raise HttpError(404, f"no process {process_id!r}")
        return described

    def _live(self, process: records.Process) -> records.Process:
        return self.engine.live.get(process.id, process)


def _definition(definition: Definition) -> dict[str, Any]:
    spec = dict(definition.spec or {"name": definition.name})
    if isinstance(spec.get("steps"), list):
        spec["steps"] = [_hide_headers(step) for step in spec["steps"]]
    return {
        "name": definition.name,
        "version": definition.version,
        "source": definition.source,
        "definition": spec,
    }


def _hide_headers(step: Any) -> Any:
    """A call's header values are where credentials go (`Bearer ${TOKEN}` in config.yaml):
    the view names the headers and hides what they hold."""
    if not isinstance(step, dict):
        return step
    shown = dict(step)
    for key in ("call", "compensate"):
        call = step.get(key)
        if isinstance(call, dict) and isinstance(call.get("headers"), dict):
            shown[key] = {**call, "headers": dict.fromkeys(call["headers"], HIDDEN)}
    return shown


def _wait(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw).total_seconds()
    except ValueError:
        raise HttpError(400, f"wait must be a duration like 30s, got {raw!r}") from None
    return min(seconds, MAX_WAIT)


def _trigger(definition: Definition) -> str | dict[str, str] | None:
    """The event topic that starts it, or its schedule."""
    schedule = definition.schedule
    if schedule is None:
        return definition.trigger
    return {"schedule": schedule.cron, "timezone": schedule.timezone}
