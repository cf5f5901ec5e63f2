"""Config hot reload: a changed file or SIGHUP applies a valid config; an invalid one is refused."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import AppClient, metric_families, until
from .processes import DaemonProcess, free_port, write_config
from .services import Receiver
from .test_sse import a_reader_falls_behind_and_is_cut_off, next_event

WAIT = {
    "name": "Permit",
    "steps": [
        {"name": "submit", "publish": "permit.submitted"},
        {"name": "docs", "wait_for": {"event": "docs.validated", "timeout": "30s"}},
        {"name": "approve", "publish": "permit.approved"},
    ],
}
CHANGED = {
    "name": "Permit",
    "route": "/api/permits",
    "steps": [
        {"name": "stamp", "publish": "permit.stamped"},
    ],
}


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    def write(**sections: Any) -> Path:
        data: dict[str, Any] = {
            "storage": {"path": str(tmp_path / "hms.db")},
            "defaults": {"probe": {"type": "none"}},
            **sections,
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


async def reloads(client: AppClient) -> dict[str, float]:
    families = await metric_families(client)
    values = {
        s.labels["result"]: s.value
        for s in families["hms_config_reloads"].samples
        if s.name == "hms_config_reloads_total"
    }
    values["last"] = families["hms_config_last_reload_successful"].samples[0].value
    return values


async def reloaded(client: AppClient, result: str, count: float = 1) -> None:
    async def done() -> bool:
        return (await reloads(client))[result] >= count

    await until(done)


async def test_a_changed_file_adds_and_removes_services_slos_and_workflows(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    path = config_file(
        services=[{"name": "ledger", "instances": [{"id": "l1", "url": "http://127.0.0.1:1"}]}]
    )
    client = await start_watched(path)
    assert (await client.get("/v1/services/payments/slos")).status == 404

    config_file(
        services=[
            {
                "name": "payments",
                "instances": [{"id": "p1", "url": "http://127.0.0.1:2"}],
                "slos": [{"name": "availability", "objective": 99.9}],
            }
        ],
        workflows=[CHANGED],
    )
    await reloaded(client, "success")
    services = await (await client.get("/v1/services")).json()
    assert [s["name"] for s in services["services"]] == [
        "payments"
    ]  # ledger's static instance went
    slos = await (await client.get("/v1/services/payments/slos")).json()
    assert [s["name"] for s in slos["slos"]] == ["availability"]
    routed = await client.post("/api/permits?wait=5s", json={"permit": 7})
    assert routed.status == 200  # ?wait: the finished process
    assert (await client.get("/api/permits")).status == 405
    assert (await client.post("/api/nothing-here")).status == 404
    assert (await client.post("/v1/health")).status == 405  # still the router's answer
    families = await metric_families(client)
    objectives = families["hms_slo_objective_ratio"].samples
    assert [s.labels for s in objectives] == [{"service": "payments", "slo": "availability"}]


async def test_an_invalid_file_is_refused_and_the_old_config_keeps_running(
    config_file: Callable[..., Path],
    start_watched: Callable[[Path], Awaitable[AppClient]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = config_file(services=[{"name": "payments"}])
    client = await start_watched(path)
    caplog.set_level(logging.ERROR)
    path.write_text(path.read_text() + "services_typo: 1\n")
    await reloaded(client, "failure")
    assert (await reloads(client))["last"] == 0
    assert "config reload refused" in caplog.text
    assert "services_typo" in caplog.text and ":" in caplog.text
    assert (await client.get("/v1/services/payments")).status == 200

    config_file(services=[{"name": "payments"}, {"name": "ledger"}])  # fixed: applied
    await reloaded(client, "success")
    assert (await reloads(client))["last"] == 1
    assert (await client.get("/v1/services/ledger")).status == 200


async def test_running_processes_keep_the_definition_they_started_with(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    client = await start_watched(config_file(workflows=[WAIT]))
    started = await (await client.post("/v1/workflows/Permit", json={"input": {}})).json()

    async def waiting() -> bool:
        body = await (await client.get(f"/v1/processes/{started['id']}")).json()
        return body["status"] == "waiting"

    await until(waiting)
    config_file(workflows=[CHANGED])
    await reloaded(client, "success")
    new = await (await client.post("/v1/workflows/Permit?wait=5s", json={"input": {}})).json()
    assert [h["step"] for h in new["history"]] == ["stamp"]

    resp = await client.post("/v1/events/docs.validated", json={})
    assert resp.status == 202

    async def completed() -> bool:
        body = await (await client.get(f"/v1/processes/{started['id']}")).json()
        return body["status"] == "completed"

    await until(completed)
    old = await (await client.get(f"/v1/processes/{started['id']}")).json()
    assert [h["step"] for h in old["history"]] == ["submit", "docs", "approve"]


def test_sighup_reloads_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port, services=[{"name": "payments"}])
    daemon = DaemonProcess(path, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        write_config(tmp_path, port, services=[{"name": "payments"}, {"name": "ledger"}])
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in daemon.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "SIGHUP: reloading" in log
    assert "config reloaded from" in log and "2 service(s)" in log


async def test_a_notification_added_by_reload_is_sent(
    config_file: Callable[..., Path],
    start_watched: Callable[[Path], Awaitable[AppClient]],
    receiver: Receiver,
) -> None:
    client = await start_watched(config_file())
    config_file(notifications=[{"name": "ops", "url": receiver.url, "events": ["grant.*"]}])
    await reloaded(client, "success")
    assert (await client.post("/v1/events/grant.paid", json={"process": "p-1"})).status == 202

    async def delivered() -> bool:
        return len(receiver.received) == 1

    await until(delivered)
    assert receiver.bodies()[0]["event"] == "grant.paid"


ADMIN = "admin-token-123"
OPS = "ops-token-12345"


def tokens(*entries: tuple[str, list[str]], protect_reads: bool = False) -> dict[str, Any]:
    return {
        "auth": {
            "tokens": [
                {"name": f"t{n}", "token": token, "scopes": scopes}
                for n, (token, scopes) in enumerate(entries)
            ],
            "protect_reads": protect_reads,
        }
    }


async def signed_in(client: AppClient, token: str) -> dict[str, str]:
    resp = await client.post("/login", data={"token": token, "next": "/"}, allow_redirects=False)
    assert resp.status == 303
    value = resp.cookies["hms_session"].value
    client.session.cookie_jar.clear()  # requests below carry the cookie only when they say so
    return {"hms_session": value}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_removed_token_and_its_sessions_stop_working_at_reload(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    both = tokens((ADMIN, ["*"]), (OPS, ["register:ops"]), protect_reads=True)
    path = config_file(server=both)
    client = await start_watched(path)
    ops_session, admin_session = await signed_in(client, OPS), await signed_in(client, ADMIN)
    body = {"url": "http://127.0.0.1:1"}
    put = await client.put("/v1/services/ops/instances/o1", json=body, headers=bearer(OPS))
    assert put.status == 201

    config_file(server=tokens((ADMIN, ["*"]), protect_reads=True))

    async def refused() -> bool:
        put = await client.put("/v1/services/ops/instances/o2", json=body, headers=bearer(OPS))
        return put.status == 401

    await until(refused)  # /metrics needs a token now, so the reload is seen by its effect
    assert (await client.get("/v1/services", cookies=ops_session)).status == 401
    # The token that stayed keeps its sessions: a reload does not sign everyone out.
    assert (await client.get("/v1/services", cookies=admin_session)).status == 200
    assert (await client.get("/v1/services/ops")).status == 401  # reads still protected


async def test_changed_scopes_apply_at_reload(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    path = config_file(server=tokens((OPS, ["register:ops"])))
    client = await start_watched(path)
    body = {"url": "http://127.0.0.1:1"}
    put = await client.put("/v1/services/billing/instances/b1", json=body, headers=bearer(OPS))
    assert put.status == 403

    config_file(server=tokens((OPS, ["register:billing"])))
    await reloaded(client, "success")
    put = await client.put("/v1/services/billing/instances/b1", json=body, headers=bearer(OPS))
    assert put.status == 201
    put = await client.put("/v1/services/ops/instances/o1", json=body, headers=bearer(OPS))
    assert put.status == 403


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"server": {"listen": "127.0.0.1:1"}}, "server.listen"),
        ({"server": {"read_timeout": "3s"}}, "server.read_timeout"),
        ({"server": tokens((ADMIN, ["*"]))}, "server.auth (turning auth on or off)"),
        ({"defaults": {"probe": {"type": "none"}, "lease": {"ttl": "5s"}}}, "defaults.lease"),
        ({"server": {"probe_budget": {"per_second": 5}}}, "server.probe_budget"),
    ],
)
async def test_a_setting_bound_at_start_refuses_the_whole_reload(
    config_file: Callable[..., Path],
    start_watched: Callable[[Path], Awaitable[AppClient]],
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    key: str,
) -> None:
    path = config_file(services=[{"name": "payments"}])
    client = await start_watched(path)
    caplog.set_level(logging.ERROR)

    ledger = {"name": "ledger", "instances": [{"id": "l1", "url": "http://127.0.0.1:1"}]}
    config_file(services=[{"name": "payments"}, ledger], **change)
    await reloaded(client, "failure")
    assert f"{key} changed" in caplog.text and "restart" in caplog.text
    services = await (await client.get("/v1/services")).json()
    assert "ledger" not in [s["name"] for s in services["services"]]  # nothing half-applied


async def test_a_reload_that_changes_tokens_ends_open_event_streams(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    both = tokens((ADMIN, ["*"]), (OPS, ["subscribe:case.*"]))
    path = config_file(server=both)
    client = await start_watched(path)
    params = {"topics": "case.*"}
    async with client.get("/v1/events", params=params, headers=bearer(OPS)) as stream:
        assert await stream.content.readline() == b": connected\n"
        config_file(server=both, services=[{"name": "payments"}])  # tokens as they were
        await reloaded(client, "success")
        await client.post("/v1/events/case.noted", json={"n": 1}, headers=bearer(ADMIN))
        assert (await next_event(stream))["data"]["data"] == {"n": 1}  # still open

        config_file(server=tokens((ADMIN, ["*"])), services=[{"name": "payments"}])
        await reloaded(client, "success", 2)
        await client.post("/v1/events/case.noted", json={"n": 2}, headers=bearer(ADMIN))
        async with asyncio.timeout(5):
            rest = await stream.content.read()  # returns at the end of the stream
    assert b"case.noted" not in rest  # a reconnect has no grant: published topics stay out


async def test_sse_buffer_applies_at_reload_to_new_streams(
    config_file: Callable[..., Path], start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    path = config_file(server={"sse_buffer": "8MiB", "overload_lag": "0s"})
    client = await start_watched(path)
    config_file(server={"sse_buffer": "64KiB", "overload_lag": "0s"})
    await reloaded(client, "success")
    await a_reader_falls_behind_and_is_cut_off(client)
