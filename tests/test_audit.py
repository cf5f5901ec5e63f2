"""The audit trail (issue 18, DESIGN §3 Audit): who changed what, when, on both stores."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from monitor.config import Config
from monitor.http.audit import TRAIL

from .conftest import BOTH_STORES, AppClient, FakeClock, until
from .processes import running_daemon
from .services import Receiver
from .test_sse import next_event

STORES = BOTH_STORES

ADMIN, PAYMENTS, AUDITOR = "admin-token-123", "payments-token-1", "auditor-token-1"
TOKENS = [
    {"name": "admin", "token": ADMIN, "scopes": ["*"]},
    {"name": "payments", "token": PAYMENTS, "scopes": ["register:payments*", "start:*"]},
    {"name": "auditor", "token": AUDITOR, "scopes": ["audit:read"]},
]
WAITING = {"name": "Waits", "steps": [{"name": "go", "wait_for": {"signal": "go"}}]}
ROUTED = {"name": "Routed", "route": "/api/apply", "steps": [{"name": "p", "publish": "applied"}]}
BODY = {"url": "http://127.0.0.1:8001"}
# The changes DESIGN §3 leaves out of the trail (a record each would be the table's whole
# size), and sign-out (it changes nothing the daemon keeps: the cookie is the session).
NOT_AUDITED = {
    "heartbeat",
    "pollTasks",
    "completeTask",
    "failTask",
    "heartbeatTask",
    "publishEvent",
    "logout",
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def up(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    config = make_config(server={"auth": {"tokens": TOKENS}}, workflows=[WAITING, ROUTED])
    return await start_daemon(config)


async def trail(client: AppClient, **query: str) -> list[dict[str, Any]]:
    resp = await client.get("/v1/audit", params=query, headers=bearer(AUDITOR))
    assert resp.status == 200, await resp.text()
    records: list[dict[str, Any]] = (await resp.json())["records"]
    return records


async def started(client: AppClient, workflow: str) -> str:
    resp = await client.post(f"/v1/workflows/{workflow}", json={}, headers=bearer(ADMIN))
    assert resp.status == 202
    process_id: str = (await resp.json())["id"]
    return process_id


async def change(client: AppClient, operation: str) -> tuple[int, str]:
    """Make the change `operation` names; (the status answered, the record's target)."""
    admin = bearer(ADMIN)
    if operation == "registerInstance":
        resp = await client.put("/v1/services/payments/instances/p9", json=BODY, headers=admin)
        return resp.status, "payments/p9"
    if operation == "deregisterInstance":
        await client.put("/v1/services/payments/instances/p8", json=BODY, headers=admin)
        resp = await client.delete("/v1/services/payments/instances/p8", headers=admin)
        return resp.status, "payments/p8"
    if operation == "defineWorkflow":
        deployed = {"name": "Deployed", "steps": [{"name": "p", "publish": "deployed"}]}
        resp = await client.put("/v1/workflows/Deployed", json=deployed, headers=admin)
        return resp.status, "Deployed"
    if operation == "startWorkflow":
        resp = await client.post("/v1/workflows/Waits", json={}, headers=admin)
        return resp.status, "Waits"
    if operation == "route_Routed":
        resp = await client.post("/api/apply", json={"n": 1}, headers=admin)
        return resp.status, "Routed"
    if operation == "cancelProcess":
        process_id = await started(client, "Waits")
        resp = await client.post(f"/v1/processes/{process_id}/cancel", headers=admin)
        return resp.status, process_id
    if operation == "signalProcess":
        process_id = await started(client, "Waits")
        path = f"/v1/processes/{process_id}/signals/go"
        resp = await client.post(path, json={"ok": True}, headers=admin)
        return resp.status, f"{process_id}/go"
    if operation == "login":
        form = {"token": ADMIN, "next": "/"}
        resp = await client.post("/login", data=form, allow_redirects=False)
        return resp.status, "session"
    raise AssertionError(f"{operation} changes state and has no scenario here: add one")


async def test_every_change_the_api_offers_leaves_exactly_one_record(up: AppClient) -> None:
    document = await (await up.get("/openapi.json")).json()
    changes = {
        operation["operationId"]: operation.get("x-hms-audit")
        for path in document["paths"].values()
        for method, operation in path.items()
        if method in ("put", "post", "delete")
    }
    unaudited = {op for op, action in changes.items() if action is None} - NOT_AUDITED
    assert not unaudited, f"changes without an audit action: {unaudited}"
    for operation, action in sorted(changes.items()):
        if action is None:
            continue
        before = await trail(up, action=action)
        status, target = await change(up, operation)
        assert 200 <= status < 400, (operation, status)
        after = await trail(up, action=action)
        new = [r for r in after if r["id"] not in {b["id"] for b in before}]
        if operation in ("cancelProcess", "signalProcess"):  # each started a process first
            new = [r for r in new if r["action"] == action]
        assert len(new) == 1, (operation, new)
        [record] = new
        assert (record["actor"], record["target"], record["outcome"]) == (
            "admin",
            target,
            status,
        ), operation
        assert record["request_id"] and record["client"] == "127.0.0.1"


async def test_a_registration_is_recorded_as_created_then_updated_never_as_unchanged(
    up: AppClient,
) -> None:
    path, headers = "/v1/services/payments/instances/p1", bearer(PAYMENTS)
    assert (await up.put(path, json=BODY, headers=headers)).status == 201
    assert (await up.put(path, json=BODY, headers=headers)).status == 200  # unchanged
    changed = {**BODY, "tags": ["eu"]}
    resp = await up.put(path, json=changed, headers=headers)
    assert resp.status == 200
    records = await trail(up, action="instance.register")
    assert [(r["actor"], r["outcome"]) for r in records] == [("payments", 201), ("payments", 200)]
    assert records[1]["request_id"] == resp.headers["X-Request-Id"]


async def test_the_token_itself_never_appears_in_the_trail(up: AppClient) -> None:
    await up.put("/v1/services/payments/instances/p1", json=BODY, headers=bearer(PAYMENTS))
    await up.put("/v1/services/other/instances/o1", json=BODY, headers=bearer(PAYMENTS))
    text = await (await up.get("/v1/audit", headers=bearer(AUDITOR))).text()
    assert "payments" in text and PAYMENTS not in text


async def test_a_thousand_bad_tokens_leave_a_row_with_their_count(up: AppClient) -> None:
    async def wrong(n: int) -> int:
        path = f"/v1/services/payments/instances/x{n}"
        resp = await up.put(path, json=BODY, headers=bearer(f"guess-{n:06d}"))
        return resp.status

    statuses = await asyncio.gather(*(wrong(n) for n in range(1000)))
    assert set(statuses) == {401}
    await up.put("/v1/services/other/instances/o1", json=BODY, headers=bearer(PAYMENTS))  # 403

    async def counted() -> bool:
        refused = await trail(up, action="auth.refused")
        return sum(r["count"] for r in refused) == 1001

    await until(counted)
    refused = await trail(up, action="auth.refused")
    assert len(refused) <= 4  # a row per actor and minute: the run may straddle one
    by_actor = {r["actor"]: r for r in refused}
    assert by_actor["anonymous"]["outcome"] == 401
    assert by_actor["anonymous"]["target"] == "PUT /v1/services/{service}/instances/{id}"
    assert by_actor["payments"]["outcome"] == 403


async def test_reading_the_trail_needs_audit_read(up: AppClient) -> None:
    assert (await up.get("/v1/audit")).status == 401
    assert (await up.get("/v1/audit", headers=bearer(PAYMENTS))).status == 403
    assert (await up.get("/v1/audit", headers=bearer(ADMIN))).status == 200  # `*`
    assert (await up.get("/v1/audit", headers=bearer(AUDITOR))).status == 200


async def test_filters_and_cursor_pages(up: AppClient, clock: FakeClock) -> None:
    for n in range(5):
        path = f"/v1/services/payments/instances/p{n}"
        assert (await up.put(path, json=BODY, headers=bearer(PAYMENTS))).status == 201
    start = clock.wall
    clock.advance(3600)
    await up.delete("/v1/services/payments/instances/p0", headers=bearer(ADMIN))
    pages, cursor = [], ""
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await up.get("/v1/audit", params=query, headers=bearer(AUDITOR))
        page = await resp.json()
        pages.append([r["target"] for r in page["records"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [
        ["payments/p0", "payments/p1"],
        ["payments/p2", "payments/p3"],
        ["payments/p4", "payments/p0"],
    ]
    assert [r["actor"] for r in await trail(up, actor="admin")] == ["admin"]
    assert len(await trail(up, action="instance.*")) == 6
    assert len(await trail(up, target="payments/p0")) == 2
    assert len(await trail(up, until=str(start + 1))) == 5
    assert [r["action"] for r in await trail(up, since=str(start + 60))] == ["instance.deregister"]
    bad = await up.get("/v1/audit", params={"since": "yesterday"}, headers=bearer(AUDITOR))
    assert bad.status == 400 and "since" in (await bad.json())["error"]["message"]


async def test_nothing_in_the_api_changes_or_deletes_a_record(up: AppClient) -> None:
    await up.put("/v1/services/payments/instances/p1", json=BODY, headers=bearer(ADMIN))
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        resp = await up.request(method, "/v1/audit", headers=bearer(ADMIN))
        assert resp.status == 405, method
    assert len(await trail(up)) == 1


async def test_audit_readers_hear_each_record_on_the_event_stream(up: AppClient) -> None:
    headers = bearer(AUDITOR)
    async with up.get("/v1/events", params={"topics": "audit.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"
        path = "/v1/services/payments/instances/p1"
        await up.put(path, json=BODY, headers=bearer(PAYMENTS))
        event = await next_event(stream)
    assert event["event"] == "audit.recorded"
    record = event["data"]["data"]
    assert (record["actor"], record["action"], record["target"]) == (
        "payments",
        "instance.register",
        "payments/p1",
    )


async def test_records_older_than_the_retention_are_pruned_and_no_others(
    up: AppClient, clock: FakeClock
) -> None:
    await up.put("/v1/services/payments/instances/old", json=BODY, headers=bearer(ADMIN))
    clock.advance(10 * 86400)
    await up.put("/v1/services/payments/instances/new", json=BODY, headers=bearer(ADMIN))
    assert await up.app[TRAIL].prune(5 * 86400) == 1
    assert [r["target"] for r in await trail(up)] == ["payments/new"]


async def test_a_config_reload_is_recorded_by_what_asked_for_it(
    tmp_path: Path,
    storage: dict[str, str],
    start_watched: Callable[[Path], Awaitable[AppClient]],
) -> None:
    path = tmp_path / "config.yaml"
    data: dict[str, Any] = {"storage": storage, "server": {"auth": {"tokens": TOKENS}}}
    path.write_text(yaml.safe_dump(data))
    client = await start_watched(path)
    path.write_text(yaml.safe_dump({**data, "services": [{"name": "ledger"}]}))

    async def recorded(count: int) -> bool:
        return len(await trail(client, action="config.reload")) >= count

    await until(lambda: recorded(1))
    path.write_text("services: [oops\n")
    await until(lambda: recorded(2))
    records = await trail(client, action="config.reload")
    assert [(r["actor"], r["outcome"], r["target"]) for r in records] == [
        ("config-file", 200, str(path)),
        ("config-file", 422, str(path)),
    ]


@pytest.mark.postgres_only
async def test_two_replicas_keep_one_trail(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    auth = {"auth": {"tokens": TOKENS}}
    one = await start_daemon(make_config(server=auth, cluster={"replica_id": "one"}))
    two = await start_daemon(make_config(server=auth, cluster={"replica_id": "two"}))
    await one.put("/v1/services/payments/instances/a", json=BODY, headers=bearer(PAYMENTS))
    await two.put("/v1/services/payments/instances/b", json=BODY, headers=bearer(ADMIN))
    for replica in (one, two):
        await replica.put(
            "/v1/services/payments/instances/x", json=BODY, headers=bearer("nope-nope")
        )
    seen = [[(r["actor"], r["target"]) for r in await trail(replica)] for replica in (one, two)]
    assert seen[0] == seen[1] == [("payments", "payments/a"), ("admin", "payments/b")]

    async def one_row() -> bool:
        refused = await trail(one, action="auth.refused")
        return [(r["actor"], r["count"]) for r in refused] == [("anonymous", 2)]

    await until(one_row)  # both replicas' refusals of the minute: one row, counted twice


async def test_kill_9_after_2xx_keeps_each_change_with_its_record(tmp_path: Path) -> None:
    """Many changes in flight, group-committed; the daemon dies right after the last 2xx.
    Every answered change is there with its record, and no record without its change."""
    with running_daemon(tmp_path, server={"auth": {"tokens": TOKENS}}) as daemon:
        async with aiohttp.ClientSession(daemon.url, headers=bearer(ADMIN)) as http:

            async def put(n: int) -> int:
                path = f"/v1/services/svc/instances/i{n}"
                async with http.put(path, json=BODY) as resp:
                    return resp.status

            assert set(await asyncio.gather(*(put(n) for n in range(100)))) == {201}
            pending = [asyncio.ensure_future(put(n)) for n in range(100, 200)]
            answered = await pending[0]
            daemon.kill()  # the others may or may not have committed: each with its record
            await asyncio.gather(*pending[1:], return_exceptions=True)
        assert answered == 201
        daemon.start()
        async with aiohttp.ClientSession(daemon.url, headers=bearer(ADMIN)) as http:
            async with http.get("/v1/services/svc") as resp:
                instances = {i["id"] for i in (await resp.json())["instances"]}
            async with http.get("/v1/audit", params={"limit": "1000"}) as resp:
                records = (await resp.json())["records"]
            daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

            async def reload_recorded() -> bool:
                async with http.get("/v1/audit", params={"action": "config.reload"}) as resp:
                    return [r["actor"] for r in (await resp.json())["records"]] == ["sighup"]

            await until(reload_recorded)
    targets = [r["target"].removeprefix("svc/") for r in records]
    assert sorted(targets) == sorted(instances)  # the same set: never one without the other
    assert {f"i{n}" for n in range(101)} <= instances


async def test_a_notification_forwards_each_record_to_a_webhook(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    receiver: Receiver,
) -> None:
    siem = {"name": "siem", "url": receiver.url, "events": ["audit.*"]}
    config = make_config(server={"auth": {"tokens": TOKENS}}, notifications=[siem])
    client = await start_daemon(config)
    for n in (1, 2):
        path = f"/v1/services/payments/instances/p{n}"
        await client.put(path, json=BODY, headers=bearer(PAYMENTS))

    async def both() -> bool:
        return len(receiver.received) >= 2

    await until(both)
    sent = [body["data"] for body in receiver.bodies()]
    assert [(r["actor"], r["target"]) for r in sent] == [
        ("payments", "payments/p1"),
        ("payments", "payments/p2"),
    ]


async def test_changes_committed_together_keep_each_its_own_record(up: AppClient) -> None:
    """A hundred registrations at once share group-committed batches; each record still
    names its own change and the request that made it."""

    async def put(n: int) -> tuple[str, str]:
        path = f"/v1/services/payments/instances/b{n}"
        resp = await up.put(path, json=BODY, headers=bearer(ADMIN))
        assert resp.status == 201
        return f"payments/b{n}", resp.headers["X-Request-Id"]

    answered = dict(await asyncio.gather(*(put(n) for n in range(100))))
    records = await trail(up, action="instance.register", limit="1000")
    assert {r["target"]: r["request_id"] for r in records} == answered
    ids = [r["id"] for r in records]
    assert ids == sorted(set(ids))
