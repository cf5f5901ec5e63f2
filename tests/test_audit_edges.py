"""The audit trail's edges (issue 18): what an independent review found, each a case that
once broke DESIGN §3 (Audit): a record without its change, a cursor that skipped one, a 5xx,
a refusal flush that stopped for good."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from monitor.config import Config
from monitor.keys import PARTS
from registry import StoreUnavailable

from .conftest import BOTH_STORES, AppClient, until
from .test_audit import ADMIN, AUDITOR, BODY, TOKENS, WAITING, bearer, started, trail
from .test_sse import next_event

STORES = BOTH_STORES

QUICK = {"name": "Quick", "steps": [{"name": "p", "publish": "quick.done"}]}


@pytest.fixture
async def up(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    config = make_config(server={"auth": {"tokens": TOKENS}}, workflows=[WAITING, QUICK])
    return await start_daemon(config)


async def test_a_start_with_a_known_idempotency_key_is_not_recorded_again(up: AppClient) -> None:
    """riders.py says a start with a known key leaves its rider unwritten (no change was
    made); the store's create is a write whatever it finds, so the rider rides it."""
    body = {"input": {}, "idempotency_key": "pay-1"}
    first = await up.post("/v1/workflows/Waits", json=body, headers=bearer(ADMIN))
    again = await up.post("/v1/workflows/Waits", json=body, headers=bearer(ADMIN))
    assert (first.status, again.status) == (202, 202)
    assert (await first.json())["id"] == (await again.json())["id"]
    assert (await again.json())["created"] is False
    records = await trail(up, action="process.start")
    assert len(records) == 1, records


@pytest.mark.postgres_only
async def test_a_refused_cancel_or_signal_of_an_ended_process_leaves_no_record(
    up: AppClient,
) -> None:
    """On PostgreSQL, Engine._running brings a process that is not live in with a claim
    (PgWorkflowStore.unfinished_of with an owner is a write): that write carries the rider,
    so a 409 leaves a `process.cancel` record saying 202 (a record without its change)."""
    process_id = await started(up, "Waits")
    resp = await up.post(f"/v1/processes/{process_id}/cancel", headers=bearer(ADMIN))
    assert resp.status == 202

    async def refused_as_ended() -> bool:  # 202 (and no write) while it is still live
        again = await up.post(f"/v1/processes/{process_id}/cancel", headers=bearer(ADMIN))
        return again.status == 409

    await until(refused_as_ended)
    signal = f"/v1/processes/{process_id}/signals/go"
    assert (await up.post(signal, json={}, headers=bearer(ADMIN))).status == 409
    cancels = await trail(up, action="process.cancel")
    assert [r["outcome"] for r in cancels] == [202], cancels
    assert await trail(up, action="process.signal") == []


@pytest.mark.postgres_only
async def test_a_cursor_reader_misses_no_record_another_replica_commits_late(
    up: AppClient, storage: dict[str, str]
) -> None:
    """On PostgreSQL ids come from a sequence at INSERT, not at COMMIT: a replica's batch
    that commits after a later id was read would be passed by the cursor for good. So
    every batch with an audit record first takes the trail's advisory lock (riders.Ordered)
    and ids commit in order. The open transaction here is the other replica's batch."""
    seen: list[str] = []
    cursor = "0"

    async def read_on() -> None:  # as a SIEM does: page by page, then from the last id
        nonlocal cursor
        while True:
            params = {"limit": "1", "cursor": cursor}
            page = await (await up.get("/v1/audit", params=params, headers=bearer(AUDITOR))).json()
            seen.extend(r["target"] for r in page["records"])
            if page["records"]:
                cursor = str(page["records"][-1]["id"])
            if page["next_cursor"] is None:
                return

    other = psycopg.connect(storage["url"])
    try:
        other.execute("SELECT pg_advisory_xact_lock(hashtext('audit_records'))")
        other.execute(
            "INSERT INTO audit_records (time, actor, action, target, outcome, request_id, "
            "client, count) VALUES (0, 'other', 'instance.register', 'payments/late', 201, "
            "'r', '10.0.0.2', 1)"
        )
        path = "/v1/services/payments/instances/"
        puts = [
            asyncio.ensure_future(up.put(path + name, json=BODY, headers=bearer(ADMIN)))
            for name in ("a", "b")
        ]
        await asyncio.sleep(0.5)  # the changes are under way meanwhile
        await read_on()
        other.commit()
    finally:
        other.close()
    assert [(await put).status for put in puts] == [201, 201]
    await read_on()
    assert sorted(seen) == ["payments/a", "payments/b", "payments/late"]


async def test_filters_that_no_record_can_match_answer_4xx_not_5xx(up: AppClient) -> None:
    """PostgreSQL text cannot hold NUL: a filter with one must not reach the database as a
    500 (it matches nothing: an empty page, or a 400)."""
    for name in ("actor", "action", "target"):
        for value in ("a\x00b", "a\x00*"):
            resp = await up.get("/v1/audit", params={name: value}, headers=bearer(AUDITOR))
            assert resp.status in (200, 400), (name, value, resp.status, await resp.text())


async def raw_request(client: AppClient, head: bytes) -> int:
    """A request as bytes (a header aiohttp's client would not send): the status line's
    status. aiohttp's server decodes header bytes that are not UTF-8 as surrogates."""
    url = client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(head)
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


UNDECODABLE = b"X-Hms-Forwarded-By: one\r\nX-Forwarded-For: 10.0.0.\xff\r\n"


async def test_a_refusal_with_an_undecodable_forwarded_for_does_not_stop_counting(
    up: AppClient,
) -> None:
    """http/audit.py client() copies X-Forwarded-For (a client may send it, with the
    forwarded-by header, straight to the daemon) into the record; neither database can
    encode a lone surrogate, so add_refusals raises UnicodeEncodeError, which flush() does
    not expect: AuditTrail.run ends, and no refusal is written again until a restart."""
    head = (
        b"PUT /v1/services/payments/instances/x HTTP/1.1\r\nHost: h\r\n"
        b"Authorization: Bearer wrong\r\n" + UNDECODABLE + b"Content-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert await raw_request(up, head) == 401
    await asyncio.sleep(1.5)  # the refusal trail's flush (FLUSH_INTERVAL) has run
    resp = await up.put("/v1/services/payments/instances/x", json=BODY, headers=bearer("no"))
    assert resp.status == 401

    async def counted() -> bool:
        return sum(r["count"] for r in await trail(up, action="auth.refused")) >= 1

    await until(counted)


async def test_a_change_with_an_undecodable_forwarded_for_is_not_a_500(up: AppClient) -> None:
    """The same header on a change: its record cannot be written, so neither can the change;
    the caller gets a 500 (and the log a traceback) for a header it sent."""
    body = b'{"url": "http://127.0.0.1:8001"}'
    head = (
        b"PUT /v1/services/payments/instances/x HTTP/1.1\r\nHost: h\r\n"
        + f"Authorization: Bearer {ADMIN}\r\n".encode()
        + UNDECODABLE
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    assert await raw_request(up, head) < 500


async def test_a_change_whose_answer_then_fails_is_still_told_to_the_log_and_the_bus(
    up: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waited start commits, then its wait fails (the database stops answering reads):
    the client gets a 503, but the start and its record are kept, and a SIEM following
    `audit.recorded` must hear of it as of any other change."""

    async def unavailable(*_: object) -> bool:
        raise StoreUnavailable("the database stopped answering")

    monkeypatch.setattr(up.app[PARTS].engine, "wait", unavailable)
    headers = bearer(AUDITOR)
    async with up.get("/v1/events", params={"topics": "audit.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"
        resp = await up.post("/v1/workflows/Waits?wait=5s", json={}, headers=bearer(ADMIN))
        assert resp.status == 503
        event = await asyncio.wait_for(next_event(stream), 5)
    record = event["data"]["data"]
    assert (record["action"], record["target"], record["outcome"]) == (
        "process.start",
        "Waits",
        202,
    )
    assert [r["id"] for r in await trail(up, action="process.start")] == [record["id"]]


async def test_a_waited_start_is_heard_when_it_starts_not_when_it_answers(up: AppClient) -> None:
    """`?wait=` holds the answer until the process ends (here: until it is signalled); the
    record of its start is on the bus as soon as the start commits, as a SIEM expects."""
    headers = bearer(AUDITOR)
    async with up.get("/v1/events", params={"topics": "audit.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"
        waited = asyncio.ensure_future(
            up.post("/v1/workflows/Waits?wait=30s", json={}, headers=bearer(ADMIN))
        )
        event = await asyncio.wait_for(next_event(stream), 10)
        assert not waited.done()  # heard while the answer still waits
        record = event["data"]["data"]
        assert (record["action"], record["target"]) == ("process.start", "Waits")
    (process,) = (await (await up.get("/v1/processes", headers=bearer(ADMIN))).json())["processes"]
    signal = f"/v1/processes/{process['id']}/signals/go"
    assert (await up.post(signal, json={}, headers=bearer(ADMIN))).status == 202
    assert (await waited).status == 200
