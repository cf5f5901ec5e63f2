"""Who did it (issue 18): a process names who started, signalled and cancelled it, a stored
event who published it; a token's name, never the token, "anonymous" without auth."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from monitor.config import Config

from .conftest import BOTH_STORES, AppClient, until
from .test_sse import next_event

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

Start = Callable[..., Awaitable[AppClient]]

ALICE = "alice-secret-4f9c2a71"
BOB = "bob-secret-8d13e6b0"
TOKENS = {
    "auth": {
        "tokens": [
            {"name": "alice", "token": ALICE, "scopes": ["*"]},
            {"name": "bob", "token": BOB, "scopes": ["*"]},
        ]
    }
}
PERMIT = {
    "name": "Permit",
    "steps": [
        {"name": "docs", "wait_for": {"signal": "docsValidated"}},
        {"name": "sign", "wait_for": {"signal": "signed"}},
    ],
}
ON_SUBMIT = {
    "name": "OnSubmit",
    "trigger": {"event": "grant.submitted"},
    "steps": [{"name": "sign", "wait_for": {"signal": "signed"}}],
}
ANNOUNCE = {"name": "Announce", "steps": [{"name": "tell", "publish": "grant.announced"}]}


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


async def read(client: AppClient, process_id: str, token: str | None) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def until_in(
    client: AppClient, process_id: str, token: str | None, *statuses: str
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await read(client, process_id, token))
        return seen["status"] in statuses

    await until(reached)
    return seen


async def started_signalled_cancelled(
    client: AppClient, starter: str | None, canceller: str | None
) -> str:
    """A Permit process started by `starter`, its first signal sent by it, cancelled by
    `canceller` while it waits for the second; its id once cancelled."""
    resp = await client.post("/v1/workflows/Permit", json={"input": {}}, headers=bearer(starter))
    assert resp.status == 202, await resp.text()
    process_id: str = (await resp.json())["id"]
    await until_in(client, process_id, starter, "waiting")
    signal = f"/v1/processes/{process_id}/signals/docsValidated"
    assert (await client.post(signal, json={"ok": True}, headers=bearer(starter))).status == 202

    async def at_sign() -> bool:
        return (await read(client, process_id, starter))["current_step"] == "sign"

    await until(at_sign)
    cancel = f"/v1/processes/{process_id}/cancel"
    assert (await client.post(cancel, headers=bearer(canceller))).status == 202
    await until_in(client, process_id, starter, "cancelled")
    return process_id


def actors(process: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    signalled = [h["signalled_by"] for h in process["history"] if h["step"] == "docs"]
    return process["started_by"], process["cancelled_by"], signalled


async def test_a_process_names_who_started_signalled_and_cancelled_it_never_the_token(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    client = await start_daemon(make_config(workflows=[PERMIT], server=TOKENS))
    process_id = await started_signalled_cancelled(client, ALICE, BOB)
    resp = await client.get(f"/v1/processes/{process_id}", headers=bearer(ALICE))
    text = await resp.text()
    assert actors(await resp.json()) == ("alice", "bob", ["alice"])
    assert ALICE not in text and BOB not in text
    listed = await client.get("/v1/processes", headers=bearer(BOB))
    [summary] = (await listed.json())["processes"]
    assert (summary["started_by"], summary["cancelled_by"]) == ("alice", "bob")


async def test_without_auth_the_actor_is_anonymous(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    client = await start_daemon(make_config(workflows=[PERMIT]))
    process_id = await started_signalled_cancelled(client, None, None)
    assert actors(await read(client, process_id, None)) == (
        "anonymous",
        "anonymous",
        ["anonymous"],
    )


async def test_who_did_it_survives_a_restart(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    config = make_config(workflows=[PERMIT], server=TOKENS)
    client = await start_daemon(config)
    process_id = await started_signalled_cancelled(client, BOB, ALICE)
    await client.close()
    client = await start_daemon(config)
    assert actors(await read(client, process_id, ALICE)) == ("bob", "alice", ["bob"])


async def test_a_process_an_event_starts_names_its_topic(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    client = await start_daemon(make_config(workflows=[ON_SUBMIT], server=TOKENS))
    resp = await client.post("/v1/events/grant.submitted", json={"n": 1}, headers=bearer(ALICE))
    assert resp.status == 202
    listed = await client.get("/v1/processes", headers=bearer(ALICE))
    [summary] = (await listed.json())["processes"]
    assert summary["started_by"] == "event:grant.submitted"


async def test_an_event_replays_after_last_event_id_with_its_publisher_beside_its_data(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    config = make_config(server=TOKENS)
    client = await start_daemon(config)
    headers = {**bearer(BOB), "Last-Event-ID": "0"}
    async with client.get("/v1/events", params={"topics": "case.*"}, headers=headers) as stream:
        resp = await client.post("/v1/events/case.noted", json={"n": 1}, headers=bearer(ALICE))
        assert resp.status == 202
        live = await next_event(stream)
    await client.close()
    client = await start_daemon(config)  # the store, reopened, replays it
    async with client.get("/v1/events", params={"topics": "case.*"}, headers=headers) as stream:
        replayed = await next_event(stream)
    for event in (live, replayed):
        assert (event["data"]["actor"], event["data"]["data"]) == ("alice", {"n": 1})


async def test_a_publish_steps_event_names_its_process(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    client = await start_daemon(make_config(workflows=[ANNOUNCE]))
    resp = await client.post("/v1/workflows/Announce", json={"input": {}})
    process_id = (await resp.json())["id"]
    await until_in(client, process_id, None, "completed")
    headers = {"Last-Event-ID": "0"}
    async with client.get("/v1/events", params={"topics": "grant.*"}, headers=headers) as stream:
        event = await next_event(stream)
    assert event["data"]["actor"] == f"process:{process_id}"
