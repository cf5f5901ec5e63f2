"""Followers forward workflow requests to the leader; the engine runs while its replica
leads. Two real daemons on their own SQLite files; the follower's leadership is a fixed
test double naming the leader (the real membership is PostgreSQL's, tested there)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.app import build_app
from monitor.config import Config
from monitor.http.forward import FORWARDED_BY

from .conftest import AppClient, FakeClock, until
from .processes import free_port
from .services import Calls

ADMIN = "admin-token"
AUTH = {"tokens": [{"name": "admin", "token": ADMIN, "scopes": ["*"]}], "protect_reads": True}
BEARER = {"Authorization": f"Bearer {ADMIN}"}
GRANT = {
    "name": "Grant",
    "route": "/api/grants",
    "trigger": {"event": "grant.submitted"},
    "steps": [
        {"name": "pay", "call": {"service": "ach", "path": "/transfers", "body": {"amount": 1}}},
        {"name": "confirm", "delay": "300ms", "call": {"service": "ach", "path": "/confirm"}},
    ],
}
TASKED = {
    "name": "Tasked",
    "queue": "work",
    "steps": [{"name": "work", "task": "doWork", "timeout": "1h"}],
}


class Leader:
    """A leadership a test sets by hand."""

    def __init__(self, is_leader: bool, leader_address: str | None = None) -> None:
        self.is_leader, self.leader_address = is_leader, leader_address
        self._callbacks: list[Callable[[], None]] = []

    def on_leadership(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def set(self, is_leader: bool, leader_address: str | None = None) -> None:
        self.is_leader, self.leader_address = is_leader, leader_address
        for callback in self._callbacks:
            callback()


Start = Callable[[Config, Leader], Awaitable[AppClient]]


@pytest.fixture
def start(aiohttp_client: Callable[..., Awaitable[AppClient]], clock: FakeClock) -> Start:
    async def start(config: Config, leadership: Leader) -> AppClient:
        app = build_app(config, clock=clock, metrics=CollectorRegistry(), leadership=leadership)
        return await aiohttp_client(app)

    return start


def config_at(make_config: Callable[..., Config], tmp_path: Path, name: str) -> Config:
    storage = {"path": str(tmp_path / f"{name}.db")}
    return make_config(storage=storage, workflows=[GRANT, TASKED], server={"auth": AUTH})


@pytest.fixture
async def leader(
    make_config: Callable[..., Config], tmp_path: Path, start: Start, service: TestServer
) -> AppClient:
    client = await start(config_at(make_config, tmp_path, "leader"), Leader(True))
    url = str(service.make_url("/"))
    resp = await client.put("/v1/services/ach/instances/i1", json={"url": url}, headers=BEARER)
    assert resp.status in (200, 201), await resp.text()
    return client


@pytest.fixture
async def follower(
    make_config: Callable[..., Config], tmp_path: Path, start: Start, leader: AppClient
) -> AppClient:
    address = str(leader.make_url("")).rstrip("/")
    return await start(config_at(make_config, tmp_path, "follower"), Leader(False, address))


async def answer(client: AppClient, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    resp = await client.request(method, path, headers=kw.pop("headers", BEARER), **kw)
    return resp.status, await resp.json()


async def until_completed(client: AppClient, process_id: str) -> None:
    async def completed() -> bool:
        status, seen = await answer(client, "GET", f"/v1/processes/{process_id}")
        return bool(status == 200 and seen["status"] == "completed")

    await until(completed)


async def test_a_workflow_started_on_a_follower_runs_once_on_the_leader(
    leader: AppClient, follower: AppClient, calls: Calls
) -> None:
    status, done = await answer(
        follower, "POST", "/v1/workflows/Grant", params={"wait": "10s"}, json={"input": {}}
    )
    assert status == 200, done
    assert done["status"] == "completed"
    assert calls.keys("/transfers") == [f"{done['id']}/pay"]
    status, seen = await answer(follower, "GET", f"/v1/processes/{done['id']}")
    assert (status, seen["status"]) == (200, "completed")
    status, on_leader = await answer(leader, "GET", f"/v1/processes/{done['id']}")
    assert (status, on_leader) == (200, seen)  # the follower showed the leader's answer


async def test_the_leader_authorizes_what_a_follower_forwards(
    leader: AppClient, follower: AppClient, calls: Calls
) -> None:
    status, error = await answer(
        follower, "POST", "/v1/workflows/Grant", headers={}, json={"input": {}}
    )
    assert (status, error["error"]["code"]) == (401, "unauthorized")
    bad = {"Authorization": "Bearer wrong"}
    status, _ = await answer(follower, "GET", "/v1/processes", headers=bad)
    assert status == 401
    assert calls.seen == []


async def test_a_route_and_a_published_event_start_processes_on_the_leader(
    leader: AppClient, follower: AppClient, calls: Calls
) -> None:
    status, by_route = await answer(follower, "POST", "/api/grants", json={"applicant": "a"})
    assert status in (200, 202), by_route
    status, published = await answer(follower, "POST", "/v1/events/grant.submitted", json={"n": 1})
    assert status in (200, 201, 202), published

    async def both_paid() -> bool:
        return len(calls.keys("/transfers")) == 2

    await until(both_paid)
    status, listing = await answer(leader, "GET", "/v1/processes", params={"workflow": "Grant"})
    assert status == 200, listing
    assert len(listing["processes"]) == 2


async def test_a_long_poll_through_a_follower_gets_the_task(
    leader: AppClient, follower: AppClient
) -> None:
    poll = asyncio.ensure_future(
        answer(follower, "POST", "/v1/tasks/poll", json={"queue": "work", "wait": "10s"})
    )
    await asyncio.sleep(0.2)  # the poll waits on the leader before the task exists
    assert not poll.done()
    status, started = await answer(follower, "POST", "/v1/workflows/Tasked", json={"input": {}})
    assert status == 202, started
    status, polled = await poll
    assert status == 200, polled
    [task] = polled["tasks"]
    status, _ = await answer(
        follower, "POST", f"/v1/tasks/{task['id']}/complete", json={"output": {"ok": True}}
    )
    assert status == 200
    await until_completed(follower, started["id"])


async def test_a_forwarded_request_is_never_forwarded_again(
    leader: AppClient, follower: AppClient, calls: Calls
) -> None:
    resp = await follower.post(
        "/v1/workflows/Grant", json={"input": {}}, headers={**BEARER, FORWARDED_BY: "r2"}
    )
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "not_leader"
    assert calls.seen == []
    # The leader serves what a follower forwarded to it.
    resp = await leader.get("/v1/workflows", headers={**BEARER, FORWARDED_BY: "r2"})
    assert resp.status == 200


async def test_no_leader_or_an_unreachable_one_answers_503_retry_after(
    make_config: Callable[..., Config], tmp_path: Path, start: Start
) -> None:
    leadership = Leader(False)
    client = await start(config_at(make_config, tmp_path, "alone"), leadership)
    resp = await client.get("/v1/processes", headers=BEARER)
    assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    assert (await resp.json())["error"]["code"] == "no_leader"
    leadership.set(False, f"http://127.0.0.1:{free_port()}")  # nobody listens there
    resp = await client.post("/v1/workflows/Grant", json={"input": {}}, headers=BEARER)
    assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    error = (await resp.json())["error"]
    assert error["code"] == "leader_unreachable"
    # What the engine does not answer is this replica's own, leader or not.
    resp = await client.get("/v1/services", headers=BEARER)
    assert resp.status == 200


async def test_the_engine_stops_when_leadership_is_lost_and_resumes_when_won(
    make_config: Callable[..., Config],
    tmp_path: Path,
    start: Start,
    service: TestServer,
    calls: Calls,
) -> None:
    leadership = Leader(True)
    client = await start(config_at(make_config, tmp_path, "switch"), leadership)
    url = str(service.make_url("/"))
    await client.put("/v1/services/ach/instances/i1", json={"url": url}, headers=BEARER)
    status, started = await answer(client, "POST", "/v1/workflows/Grant", json={"input": {}})
    assert status == 202, started

    async def paid() -> bool:
        return bool(calls.keys("/transfers"))

    await until(paid)
    leadership.set(False, None)  # lost during the delay: the confirm waits for a leader
    await asyncio.sleep(0.6)
    assert calls.keys("/confirm") == []
    resp = await client.get(f"/v1/processes/{started['id']}", headers=BEARER)
    assert resp.status == 503

    leadership.set(True)

    await until_completed(client, started["id"])
    assert calls.keys("/transfers") == [f"{started['id']}/pay"]
    assert calls.keys("/confirm") == [f"{started['id']}/confirm"]


async def test_a_forward_to_a_leader_gone_silent_ends_when_another_leads(
    make_config: Callable[..., Config], tmp_path: Path, start: Start
) -> None:
    """A paused leader keeps its connections open: the follower's forwards to it end with
    503 when the leadership moves, not when (or if) the old leader wakes."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    try:
        leadership = Leader(False, f"http://127.0.0.1:{port}")
        client = await start(config_at(make_config, tmp_path, "follower"), leadership)
        forwarded = asyncio.ensure_future(client.get("/v1/processes", headers=BEARER))
        await asyncio.sleep(0.3)
        assert not forwarded.done()  # hanging on the silent leader
        leadership.set(False, None)  # another leads now; this replica has not learnt where
        resp = await asyncio.wait_for(forwarded, 5)
        assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
        assert (await resp.json())["error"]["code"] == "leader_unreachable"
    finally:
        silent.close()
        await silent.wait_closed()


async def test_a_forwarded_start_is_recorded_once_by_the_leader_with_the_callers_address(
    leader: AppClient, follower: AppClient
) -> None:
    status, _ = await answer(follower, "POST", "/v1/workflows/Grant", json={"input": {}})
    assert status == 202
    query = {"action": "process.*"}
    _, on_leader = await answer(leader, "GET", "/v1/audit", params=query)
    [record] = on_leader["records"]
    assert (record["actor"], record["target"]) == ("admin", "Grant")
    assert record["client"] == "127.0.0.1 via 127.0.0.1"  # the caller, then the follower
    _, on_follower = await answer(follower, "GET", "/v1/audit", params=query)
    assert on_follower["records"] == []  # it forwarded, nothing more (its own SQLite file)
