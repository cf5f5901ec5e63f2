"""`Client`: the daemon's workflows, registry and event bus as Python verbs (DESIGN.md §3, §7).

    async with Client("http://127.0.0.1:9797") as hms:
        report = await hms.run("GrantPayment", {"amount": 100}, timeout=30)

Waiting is done by the daemon where it can (`POST /v1/workflows/{name}?wait=`, which
answers when the process ends or its `respond_after` step is done); `handle.result()`
of a process started earlier polls `GET /v1/processes/{id}` with a growing interval,
since the API has no blocking read of one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from .durations import Duration, duration_text, seconds
from .errors import HmsError, Unavailable, Unreachable, error_for
from .workflow import Workflow

log = logging.getLogger(__name__)

ENDED = frozenset({"completed", "failed", "compensated", "cancelled"})
FAILED = frozenset({"failed", "compensating", "compensated", "cancelled"})
MAX_WAIT = 300.0  # the daemon's cap on `?wait=`; longer waits go on by polling
REQUEST_TIMEOUT = 30.0
POLL_FIRST, POLL_MAX = 0.05, 1.0
RESUBSCRIBE_FIRST, RESUBSCRIBE_MAX = 0.1, 5.0
SSE_READ_TIMEOUT = 60.0  # the daemon sends a keepalive every 15 s: this much silence is a dead link


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """How a process went: what `run` and `handle.result` return.

    `success` is true when the process completed, or when the daemon answered at the
    workflow's `respond_after` step while the rest goes on (not failed, not ended)."""

    success: bool
    status: str
    output: Any
    error: dict[str, Any] | None
    process_id: str
    process: Mapping[str, Any] = field(repr=False)

    @classmethod
    def of(cls, process: Mapping[str, Any]) -> Report:
        status = str(process["status"])
        # `output` once the daemon has it (issue 15); before, every step's output.
        output = process["output"] if "output" in process else process.get("outputs")
        error = process.get("error")
        if isinstance(error, str):  # daemons before issue 15 kept a message only
            error = {"step": None, "message": error, "status": None, "body": None}
        return cls(
            success=status not in FAILED,
            status=status,
            output=output,
            error=error,
            process_id=str(process["id"]),
            process=process,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the bus as the SSE stream carries it; `id` orders and resumes the stream."""

    id: int
    topic: str
    time: float
    data: Any
    # Who published it (a token's name, `anonymous`, `process:<id>` for a publish step);
    # None for the daemon's own news.
    actor: str | None = None


class ProcessHandle:
    """A started process: `status()` reads it, `result(timeout)` waits for its end."""

    def __init__(self, client: Client, process_id: str, workflow: str | None = None) -> None:
        self._client = client
        self.id = process_id
        self.workflow = workflow

    def __repr__(self) -> str:
        return f"ProcessHandle(id={self.id!r}, workflow={self.workflow!r})"

    async def status(self) -> dict[str, Any]:
        """The process, as `GET /v1/processes/{id}`: status, input, outputs, steps, history."""
        return await self._client.process(self.id)

    async def result(self, timeout: Duration = 30) -> Report:
        """The Report once the process has ended; TimeoutError when `timeout` passes first."""
        limit = seconds(timeout)
        deadline = time.monotonic() + limit
        pause = POLL_FIRST
        while True:
            process = await self.status()
            if process["status"] in ENDED:
                return Report.of(process)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {self.id} still {process['status']} after {limit:g}s")
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 1.5, POLL_MAX)

    async def signal(self, name: str, data: Any = None) -> None:
        await self._client.signal(self.id, name, data)

    async def cancel(self) -> dict[str, Any]:
        return await self._client.cancel(self.id)


class RoundRobin:
    """Passing instances of a service in turn; the list is looked up again every `refresh` s."""

    def __init__(self, client: Client, service: str, refresh: Duration = 5) -> None:
        self._client = client
        self.service = service
        self._refresh = seconds(refresh)
        self._urls: list[str] = []
        self._at = -float("inf")
        self._next = 0

    async def next(self) -> str:
        """The next URL; LookupError when no instance of the service is passing."""
        if time.monotonic() - self._at >= self._refresh or not self._urls:
            self._urls = await self._client.lookup(self.service)
            self._at = time.monotonic()
        if not self._urls:
            raise LookupError(f"no passing instance of {self.service!r}")
        url = self._urls[self._next % len(self._urls)]
        self._next += 1
        return url


class Client:
    """The async client: one aiohttp session to one daemon; use it as `async with`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.request_timeout = request_timeout
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # Workflows

    async def start(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> ProcessHandle:
        """Start a process (202 at once); the same idempotency key gives the same process."""
        _, body = await self._start(workflow, input, idempotency_key, wait=None)
        return ProcessHandle(self, str(body["id"]), workflow)

    def handle(self, process_id: str) -> ProcessHandle:
        """A handle to a process started elsewhere (its id from a list, an event, a log)."""
        return ProcessHandle(self, process_id)

    async def run(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: Duration = 30,
        idempotency_key: str | None = None,
    ) -> Report:
        """Start and wait: the Report when the process ends or passes its `respond_after` step.

        A retry after a TimeoutError with the same `idempotency_key` waits for the same
        process instead of starting another."""
        limit = seconds(timeout)
        deadline = time.monotonic() + limit
        key = idempotency_key or str(uuid.uuid4())
        status, body = await self._start(workflow, input, key, wait=min(limit, MAX_WAIT))
        while status != 200:  # 200: ended, or past its `respond_after` step
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {body['id']} still {body['status']} after {limit:g}s")
            # The same key gives the same process, and the daemon waits for it again: for
            # its end or its `respond_after` step (a poll of the process would see its end only).
            status, body = await self._start(workflow, input, key, wait=min(left, MAX_WAIT))
        return Report.of(body)

    async def process_workflow(
        self, workflow: str, input: Mapping[str, Any] | None = None, timeout: Duration = 30
    ) -> dict[str, Any]:
        """`{"status": <process status>, **output}`, as the seeds' ManagementLayer answers.

        The output is the workflow's `output:` (all step outputs without one); an output
        that is not an object comes as `"output"`, a failure's error as `"error"`.
        TimeoutError when `timeout` passes first."""
        report = await self.run(workflow, input, timeout=timeout)
        if report.output is None:  # a failed process has no output
            output: Mapping[str, Any] = {}
        elif isinstance(report.output, Mapping):
            output = report.output
        else:
            output = {"output": report.output}
        answer: dict[str, Any] = {"status": report.status, **output}
        answer["status"] = report.status  # an output key `status` must not pass for it
        if report.error is not None:
            answer["error"] = report.error
        return answer

    async def process(self, process_id: str) -> dict[str, Any]:
        """`GET /v1/processes/{id}`."""
        return dict(await self._call("GET", f"/v1/processes/{_seg(process_id)}"))

    async def signal(self, process_id: str, name: str, data: Any = None) -> None:
        """Hand `data` to the process's `wait_for: {signal: name}` step (kept if it comes early)."""
        path = f"/v1/processes/{_seg(process_id)}/signals/{_seg(name)}"
        await self._call("POST", path, json={} if data is None else data)

    async def cancel(self, process_id: str) -> dict[str, Any]:
        """Stop the process; the daemon compensates the steps already done."""
        return dict(await self._call("POST", f"/v1/processes/{_seg(process_id)}/cancel"))

    async def deploy(self, definition: Workflow | Mapping[str, Any]) -> dict[str, Any]:
        """`PUT /v1/workflows/{name}`: define or replace a workflow, built or as JSON (a
        Worker deploys its `workflows` itself); the answer carries its `version`. The same
        definition again changes nothing; a changed one is a new version."""
        if isinstance(definition, Workflow):
            definition = definition.definition()
        name = str(definition["name"])
        return dict(await self._call("PUT", f"/v1/workflows/{_seg(name)}", json=definition))

    async def workflow(self, name: str) -> dict[str, Any]:
        """`GET /v1/workflows/{name}`: name, version, source and definition."""
        return dict(await self._call("GET", f"/v1/workflows/{_seg(name)}"))

    # Registry

    async def lookup(self, service: str) -> list[str]:
        """URLs of the service's passing instances (none known: an empty list)."""
        body = await self._call(
            "GET", f"/v1/services/{_seg(service)}", params={"health": "passing"}
        )
        return [str(i["url"]) for i in body.get("instances", ()) if i.get("url")]

    def round_robin(self, service: str, refresh: Duration = 5) -> RoundRobin:
        """`await balancer.next()` gives the passing instances' URLs in turn."""
        return RoundRobin(self, service, refresh)

    # Events

    async def publish(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int | None:
        """Publish on the bus; the event's id (None: a duplicate of that idempotency key)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = await self._call(
            "POST", f"/v1/events/{_seg(topic)}", json=dict(data or {}), headers=headers
        )
        event_id = body.get("id")
        return int(event_id) if event_id is not None else None

    async def subscribe(
        self, *topics: str, last_event_id: int | None = None
    ) -> AsyncGenerator[Event, None]:
        """Events of these topics (globs; none: all) as they come, forever.

        A dropped stream (the daemon restarting, a reload, a slow reader cut off) is
        resumed with `Last-Event-ID`, with a growing pause between attempts, so no
        event is missed nor repeated while the daemon keeps it (`event_retention`).
        Refusals (401, 403, 400) are raised."""
        params = {"topics": ",".join(topics)} if topics else {}
        pause = RESUBSCRIBE_FIRST
        while True:
            try:
                async for event in self._stream(params, last_event_id):
                    last_event_id = event.id
                    pause = RESUBSCRIBE_FIRST
                    yield event
            except (aiohttp.ClientError, TimeoutError, Unreachable) as exc:
                log.info("event stream dropped (%s); resuming after %s", exc, last_event_id)
            except HmsError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, RESUBSCRIBE_MAX)

    async def _stream(self, params: dict[str, str], after: int | None) -> AsyncIterator[Event]:
        headers = dict(self.headers)
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=SSE_READ_TIMEOUT)
        async with self._http().get(
            self.url + "/v1/events", params=params, headers=headers, timeout=timeout
        ) as resp:
            if resp.status >= 400:
                raise error_for(resp.status, await _body(resp))
            fields: dict[str, str] = {}
            async for raw in resp.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line:
                    if not line.startswith(":"):
                        key, _, value = line.partition(":")
                        fields[key] = value.removeprefix(" ")
                    continue
                if "data" in fields:
                    body = json.loads(fields["data"])
                    yield Event(
                        id=int(body.get("id", fields.get("id", 0))),
                        topic=str(body.get("topic", fields.get("event", ""))),
                        time=float(body.get("time", 0.0)),
                        data=body.get("data"),
                        actor=body.get("actor"),
                    )
                fields = {}

    # HTTP

    async def _start(
        self,
        workflow: str,
        input: Mapping[str, Any] | None,
        idempotency_key: str | None,
        wait: float | None,
    ) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"input": dict(input or {})}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        params = {"wait": duration_text(wait)} if wait else None
        timeout = (wait or 0) + self.request_timeout
        path = f"/v1/workflows/{_seg(workflow)}"
        status, answer = await self._request(
            "POST", path, json=body, params=params, timeout=timeout
        )
        return status, dict(answer)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON of a 2xx answer ({} when empty); else the HmsError."""
        return (await self._request(method, path, **kwargs))[1]

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """One request: its status and decoded JSON ({} when empty); non-2xx raise HmsError."""
        try:
            async with self._http().request(
                method,
                self.url + path,
                json=json,
                params=params,
                headers={**self.headers, **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=timeout or self.request_timeout),
            ) as resp:
                body = await _body(resp)
                if resp.status >= 400:
                    raise error_for(resp.status, body)
                return resp.status, body if body is not None else {}
        except aiohttp.ClientConnectionError as exc:
            raise Unreachable(0, "unreachable", f"{self.url}: {exc}") from exc
        except aiohttp.InvalidURL:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A cut answer, a request that outlived its timeout: the daemon may answer the
            # next one, like a 5xx. Callers that retry on Unavailable retry these too.
            raise Unavailable(0, "unavailable", f"{self.url}: {_reason(exc)}") from exc

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session


async def _body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _seg(value: str) -> str:
    return quote(value, safe="")
