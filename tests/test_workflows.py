"""Workflows in the running daemon, calling a real HTTP service registered in the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.keys import BUS
from scheduler import Event

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families, until
from .processes import free_port
from .services import Calls

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

FAST_RETRY = {"max_attempts": 3, "backoff": "20ms", "max_backoff": "50ms"}

GRANT = {
    "name": "GrantPayment",
    "route": "/api/grants",
    "trigger": {"event": "grant.submitted"},
    "steps": [
        {"name": "validate", "call": {"service": "applications", "path": "/validate"}},
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.amount}"}},
            "compensate": {"service": "ach", "path": "/transfers/{steps.pay.payment_id}/cancel"},
            "retry": FAST_RETRY,
        },
        {
            "name": "follow_up",
            "delay": "200ms",
            "call": {
                "service": "ach",
                "method": "GET",
                "path": "/transfers/{steps.pay.payment_id}",
            },
        },
        {"name": "notify", "publish": "grant.paid"},
    ],
}
PERMIT = {
    "name": "BuildingPermit",
    "steps": [
        {"name": "submit", "call": {"service": "applications", "path": "/submit"}},
        {
            "name": "docs",
            "wait_for": {
                "event": "docs.validated",
                "match": {"application": "{input.application}"},
                "timeout": "5s",
            },
        },
        {"name": "approve", "call": {"service": "applications", "path": "/approve"}},
    ],
}
CHILD_SUPPORT = {
    "name": "ChildSupportPayment",
    "steps": [
        {"name": "validate", "call": {"service": "applications", "path": "/validate"}},
        {
            "name": "reserve",
            "call": {"service": "ach", "path": "/reserve"},
            "compensate": {"service": "ach", "path": "/release"},
        },
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.amount}"}},
            "retry": FAST_RETRY,
        },
        {"name": "notify", "call": {"service": "applications", "path": "/notify"}},
    ],
}
SLOW = {
    "name": "Slow",
    "deadline": "300ms",
    "steps": [
        {
            "name": "reserve",
            "call": {"service": "ach", "path": "/reserve"},
            "compensate": {"service": "ach", "path": "/release"},
        },
        {"name": "later", "delay": "1s", "call": {"service": "ach", "path": "/later"}},
    ],
}


@pytest.fixture
async def daemon(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> AppClient:
    client = await start_daemon(make_config(workflows=[GRANT, PERMIT, CHILD_SUPPORT, SLOW]))
    for name in ("applications", "ach"):
        await register(client, name, "i1", str(service.make_url("/")))
    return client


async def register(client: AppClient, service: str, instance: str, url: str) -> None:
    resp = await client.put(f"/v1/services/{service}/instances/{instance}", json={"url": url})
    assert resp.status in (200, 201), await resp.text()


async def start(client: AppClient, name: str, body: dict[str, Any], wait: str = "10s") -> Any:
    resp = await client.post(f"/v1/workflows/{name}", params={"wait": wait}, json=body)
    assert resp.status in (200, 202), await resp.text()
    return await resp.json()


async def process(client: AppClient, process_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def until_status(client: AppClient, process_id: str, *statuses: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await process(client, process_id))
        return seen["status"] in statuses

    await until(reached)
    return seen


def events_of(client: AppClient, pattern: str) -> list[Event]:
    seen: list[Event] = []
    client.app[BUS].subscribe(pattern, seen.append, name="test")
    return seen


async def test_grant_payment_runs_every_step_with_a_durable_delay(
    daemon: AppClient, calls: Calls
) -> None:
    paid = events_of(daemon, "grant.paid")
    done = await start(daemon, "GrantPayment", {"input": {"amount": 125.5}})
    assert done["status"] == "completed"
    assert done["outputs"]["pay"]["amount"] == 125.5  # the template kept the number's type
    payment = done["outputs"]["pay"]["payment_id"]
    assert done["outputs"]["follow_up"] == {"payment_id": payment, "state": "settled"}
    assert calls.paths() == ["/validate", "/transfers", f"/transfers/{payment}"]
    assert calls.keys("/validate") == [f"{done['id']}/validate"]
    steps = [(a["step"], a["outcome"]) for a in done["history"]]
    assert steps == [("validate", "ok"), ("pay", "ok"), ("follow_up", "ok"), ("notify", "ok")]
    follow_up = done["history"][2]
    assert follow_up["started_at"] - done["history"][1]["ended_at"] >= 0.0
    await asyncio.sleep(0.05)
    assert [e.data["process"] for e in paid] == [done["id"]]


async def test_retries_keep_the_idempotency_key_and_stop_at_4xx(
    daemon: AppClient, calls: Calls
) -> None:
    calls.fail["/transfers"] = [503, 429]
    done = await start(daemon, "GrantPayment", {"input": {"amount": 1}})
    assert done["status"] == "completed"
    attempts = [a for a in done["history"] if a["step"] == "pay"]
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in attempts] == [
        (1, "error", 503),
        (2, "error", 429),
        (3, "ok", 200),
    ]
    assert set(calls.keys("/transfers")) == {f"{done['id']}/pay"}

    calls.seen.clear()
    calls.fail["/transfers"] = [422]  # a client error is not retried
    failed = await start(daemon, "ChildSupportPayment", {"input": {"amount": 1}})
    assert [a["attempt"] for a in failed["history"] if a["step"] == "pay"] == [1]


async def test_a_payment_that_fails_for_good_is_compensated(
    daemon: AppClient, calls: Calls
) -> None:
    calls.fail["/transfers"] = [503, 503, 503]
    ended = events_of(daemon, "workflow.*")
    done = await start(daemon, "ChildSupportPayment", {"input": {"amount": 40}})
    assert done["status"] == "compensated"
    assert (done["error"]["step"], done["error"]["message"]) == ("pay", "HTTP 503")
    assert calls.paths() == [
        "/validate",
        "/reserve",
        "/transfers",
        "/transfers",
        "/transfers",
        "/release",
    ]
    assert calls.keys("/release") == [f"{done['id']}/reserve.compensate"]
    assert "/notify" not in calls.paths()
    await asyncio.sleep(0.05)
    assert "workflow.compensated" in [e.topic for e in ended]


async def test_a_failed_compensation_fails_the_process_with_the_reason(
    daemon: AppClient, calls: Calls
) -> None:
    calls.fail["/transfers"] = [400]
    calls.fail["/release"] = [500, 500, 500]
    done = await start(daemon, "ChildSupportPayment", {"input": {"amount": 40}})
    assert done["status"] == "failed"
    assert "compensation of reserve failed: HTTP 500" in done["error"]["message"]


async def test_building_permit_waits_for_the_matching_reply(
    daemon: AppClient, calls: Calls
) -> None:
    started = await start(daemon, "BuildingPermit", {"input": {"application": "A-7"}}, wait="0s")
    waiting = await until_status(daemon, started["id"], "waiting")
    assert waiting["current_step"] == "docs"
    other = await daemon.post("/v1/events/docs.validated", json={"application": "B-1"})
    assert other.status == 202
    await asyncio.sleep(0.2)
    assert (await process(daemon, started["id"]))["status"] == "waiting"
    reply = await daemon.post("/v1/events/docs.validated", json={"application": "A-7", "ok": True})
    assert reply.status == 202
    done = await until_status(daemon, started["id"], "completed")
    assert done["outputs"]["docs"] == {"application": "A-7", "ok": True}
    assert calls.paths() == ["/submit", "/approve"]


async def test_failover_to_another_instance_on_connection_errors(
    daemon: AppClient, calls: Calls
) -> None:
    await register(daemon, "applications", "i0-down", f"http://127.0.0.1:{free_port()}")
    results = [await start(daemon, "GrantPayment", {"input": {"amount": 2}}) for _ in range(4)]
    assert {r["status"] for r in results} == {"completed"}
    instances = {a["instance"] for r in results for a in r["history"] if a["step"] == "validate"}
    assert instances == {"i1"}  # the dead instance was tried, then the live one answered


async def test_cancel_stops_and_compensates(daemon: AppClient, calls: Calls) -> None:
    started = await start(daemon, "Slow", {"input": {}}, wait="0s")
    await until_status(daemon, started["id"], "waiting")
    resp = await daemon.post(f"/v1/processes/{started['id']}/cancel")
    assert resp.status == 202
    done = await until_status(daemon, started["id"], "cancelled")
    assert "/later" not in calls.paths()
    assert calls.paths()[-1] == "/release"
    again = await daemon.post(f"/v1/processes/{started['id']}/cancel")
    assert again.status == 409
    assert done["finished_at"] is not None


async def test_a_missed_deadline_is_marked_and_counted_while_the_process_goes_on(
    daemon: AppClient, clock: FakeClock
) -> None:
    missed = events_of(daemon, "workflow.deadline_missed")
    done = await start(daemon, "Slow", {"input": {}})
    assert done["status"] == "completed"
    assert done["deadline_missed"] is True
    assert [e.data["process"] for e in missed] == [done["id"]]
    families = await metric_families(daemon)
    counted = [
        s.value
        for s in families["hms_workflow_deadline_missed"].samples
        if s.labels["workflow"] == "Slow" and s.name.endswith("_total")
    ]
    assert counted == [1]
    clock.advance(60)
    slo = await (await daemon.get("/v1/workflows/Slow/slo")).json()
    assert slo["sli"] == 0.0  # one process, late


async def test_the_same_idempotency_key_is_the_same_process(daemon: AppClient) -> None:
    body = {"input": {"amount": 3}, "idempotency_key": "grant-2026-0001"}
    first = await start(daemon, "GrantPayment", body, wait="0s")
    second = await start(daemon, "GrantPayment", body, wait="0s")
    assert second["id"] == first["id"]
    assert (first["created"], second["created"]) == (True, False)


async def test_events_and_the_router_start_processes(daemon: AppClient) -> None:
    resp = await daemon.post("/v1/events/grant.submitted", json={"amount": 9})
    assert resp.status == 202
    resp = await daemon.post("/api/grants", json={"amount": 10}, params={"wait": "10s"})
    assert resp.status == 200
    routed = await resp.json()
    assert routed["input"] == {"amount": 10} and routed["status"] == "completed"
    listed = await (await daemon.get("/v1/processes", params={"workflow": "GrantPayment"})).json()
    assert sorted(p["id"] for p in listed["processes"]) != []
    inputs = [(await process(daemon, p["id"]))["input"] for p in listed["processes"]]
    assert {"amount": 9} in inputs and {"amount": 10} in inputs


async def test_process_list_pages_with_a_cursor(daemon: AppClient) -> None:
    ids = [
        (await start(daemon, "GrantPayment", {"input": {"amount": n}}, "0s"))["id"]
        for n in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await daemon.get("/v1/processes", params=params)).json()
        seen += [p["id"] for p in page["processes"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    workflows = await (await daemon.get("/v1/workflows")).json()
    grant = next(w for w in workflows["workflows"] if w["name"] == "GrantPayment")
    assert sum(grant["counts"].values()) == 5


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/workflows/Nope", {}, 404),
        ("POST", "/v1/workflows/GrantPayment", {"input": [1]}, 422),
        ("POST", "/v1/workflows/GrantPayment", {"surprise": 1}, 422),
        ("GET", "/v1/processes?status=sleeping", None, 400),
        ("GET", "/v1/processes?limit=0", None, 400),
        ("GET", "/v1/processes/unknown", None, 404),
        ("POST", "/v1/processes/unknown/cancel", None, 404),
        ("POST", "/v1/events/workflow.completed", {}, 403),
        ("POST", "/v1/events/docs.validated", [1, 2], 422),
        ("POST", "/v1/events/bad topic!", {}, 400),
        ("GET", "/v1/workflows/Nope/slo", None, 404),
    ],
)
async def test_bad_requests_get_the_json_error_shape(
    daemon: AppClient, method: str, path: str, body: Any, status: int
) -> None:
    resp = await daemon.request(method, path, json=body)
    assert resp.status == status, await resp.text()
    assert set((await resp.json())["error"]) == {"code", "message", "details"}


async def test_events_stream_as_server_sent_events(daemon: AppClient) -> None:
    async with daemon.get("/v1/events", params={"topics": "docs.*"}) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert await stream.content.readline() == b": connected\n"
        await stream.content.readline()
        await daemon.post("/v1/events/other.topic", json={"n": 0})
        await daemon.post("/v1/events/docs.validated", json={"application": "X"})
        lines = [await stream.content.readline() for _ in range(3)]
    assert lines[1] == b"event: docs.validated\n"
    assert b'"application":"X"' in lines[2]


async def test_finished_processes_are_pruned_after_the_retention(
    daemon: AppClient, clock: FakeClock
) -> None:
    from monitor.keys import ENGINE

    done = await start(daemon, "GrantPayment", {"input": {"amount": 5}})
    running = await start(daemon, "Slow", {"input": {}}, wait="0s")
    clock.advance(10)
    await daemon.app[ENGINE].prune(retention=5.0)  # the scheduler's job: finished 10 s ago
    assert (await daemon.get(f"/v1/processes/{done['id']}")).status == 404
    assert (await daemon.get(f"/v1/processes/{running['id']}")).status == 200  # unfinished stay
    workflows = await (await daemon.get("/v1/workflows")).json()
    grant = next(w for w in workflows["workflows"] if w["name"] == "GrantPayment")
    assert grant["counts"]["completed"] == 0
