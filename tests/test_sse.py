"""The event stream: resume after Last-Event-ID, retention, daemon topics, the topic label,
publish steps' snapshots (DESIGN.md §3 Events, §4)."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from monitor.config import Config, ConfigError, parse_config
from monitor.keys import BUS, CONFIG, ENGINE

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families, until
from .services import Receiver

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

ADMIN = "admin-token-123"
READER = "reader-token-123"  # may see grant.* only


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def next_event(stream: aiohttp.ClientResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next event of an SSE stream: its `id`, `event` and decoded `data`."""
    fields: dict[str, Any] = {}
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.content.readline()).decode().rstrip("\n")
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):  # a comment: connected, keepalive
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value


async def publish(client: AppClient, topic: str, n: int, **headers: str) -> int:
    resp = await client.post(f"/v1/events/{topic}", json={"n": n}, headers=headers)
    assert resp.status == 202, await resp.text()
    event_id: int = (await resp.json())["id"]
    return event_id


async def test_a_reconnect_with_last_event_id_gets_the_missed_events_then_live_ones(
    daemon: AppClient,
) -> None:
    async with daemon.get("/v1/events", params={"topics": "case.*"}) as stream:
        for n in (1, 2):
            await publish(daemon, "case.noted", n)
        first, second = await next_event(stream), await next_event(stream)
    assert [first["data"]["data"]["n"], second["data"]["data"]["n"]] == [1, 2]
    for n in (3, 4, 5):
        await publish(daemon, "case.noted", n)
    headers = {"Last-Event-ID": second["id"]}
    async with daemon.get("/v1/events", params={"topics": "case.*"}, headers=headers) as stream:
        replayed = [await next_event(stream) for _ in range(3)]
        await publish(daemon, "case.noted", 6)
        live = await next_event(stream)
    assert [e["data"]["data"]["n"] for e in replayed] == [3, 4, 5]
    assert live["data"]["data"]["n"] == 6
    ids = [int(e["id"]) for e in (second, *replayed, live)]
    assert ids == sorted(set(ids))  # no duplicate, in order


async def test_replay_has_no_gap_or_duplicate_with_events_published_meanwhile(
    daemon: AppClient,
) -> None:
    for n in range(20):
        await publish(daemon, "case.noted", n)
    publishing = asyncio.gather(*(publish(daemon, "case.noted", n) for n in range(20, 40)))
    headers = {"Last-Event-ID": "0"}
    async with daemon.get("/v1/events", params={"topics": "case.*"}, headers=headers) as stream:
        await publishing
        seen = [(await next_event(stream))["data"]["data"]["n"] for _ in range(40)]
    assert sorted(seen) == list(range(40))


async def test_replay_keeps_to_the_topics_and_the_subscribe_scopes(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    tokens = [
        {"name": "admin", "token": ADMIN, "scopes": ["*"]},
        {"name": "reader", "token": READER, "scopes": ["subscribe:grant.*"]},
    ]
    client = await start_daemon(make_config(server={"auth": {"tokens": tokens}}))
    for topic in ("grant.submitted", "payment.made", "grant.paid", "case.noted"):
        await publish(client, topic, 0, **bearer(ADMIN))
    await publish(client, "case.closed", 1, **bearer(ADMIN))  # the live one: everyone's end
    headers = {**bearer(READER), "Last-Event-ID": "0"}
    async with client.get("/v1/events", params={"topics": "grant.*"}, headers=headers) as reader:
        grants = [(await next_event(reader))["event"] for _ in range(2)]
    headers = {**bearer(ADMIN), "Last-Event-ID": "0"}
    async with client.get("/v1/events", params={"topics": "case.*"}, headers=headers) as admin:
        cases = [(await next_event(admin))["event"] for _ in range(2)]
    assert grants == ["grant.submitted", "grant.paid"]
    assert cases == ["case.noted", "case.closed"]

    headers = {**bearer(READER), "Last-Event-ID": "0"}
    async with client.get("/v1/events", params={"topics": "*"}, headers=headers) as reader:
        topics = [(await next_event(reader))["event"] for _ in range(2)]
        await publish(client, "grant.more", 2, **bearer(ADMIN))
        topics.append((await next_event(reader))["event"])
    assert topics == ["grant.submitted", "grant.paid", "grant.more"]  # no payment, no case


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
async def test_a_malformed_last_event_id_is_400(daemon: AppClient, value: str) -> None:
    resp = await daemon.get("/v1/events", headers={"Last-Event-ID": value})
    assert resp.status == 400
    assert set((await resp.json())["error"]) == {"code", "message", "details"}


async def test_events_are_replayed_for_the_event_retention_then_pruned(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await start_daemon(make_config(storage={"event_retention": "1h"}))
    await publish(client, "case.old", 1)
    clock.advance(3600 - 1)
    await publish(client, "case.new", 2)
    clock.advance(2)
    storage = client.app[CONFIG].storage
    await client.app[ENGINE].prune(  # the scheduler's job
        storage.process_retention.total_seconds(), storage.event_retention.total_seconds()
    )
    async with client.get("/v1/events", headers={"Last-Event-ID": "0"}) as stream:
        assert (await next_event(stream))["event"] == "case.new"


async def test_event_retention_defaults_to_seven_days(make_config: Callable[..., Config]) -> None:
    assert make_config().storage.event_retention.total_seconds() == 7 * 86400


async def test_ids_go_on_after_a_restart_and_old_ids_still_resume(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = make_config()
    first = await start_daemon(config)
    before = [await publish(first, "case.noted", n) for n in range(3)]
    await first.close()
    second = await start_daemon(config)
    after = await publish(second, "case.noted", 3)
    assert after > before[-1]
    async with second.get("/v1/events", headers={"Last-Event-ID": str(before[0])}) as stream:
        replayed = [(await next_event(stream))["data"]["data"]["n"] for _ in range(3)]
    assert replayed == [1, 2, 3]


@pytest.mark.parametrize(
    "topic", ["health.changed", "slo.burn", "workflow.failed", "registry.changed", "audit.recorded"]
)
async def test_publishing_the_daemons_own_topics_is_refused(daemon: AppClient, topic: str) -> None:
    resp = await daemon.post(f"/v1/events/{topic}", json={"forged": True})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"]


Intake = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def intake(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    receiver: Receiver,
) -> Intake:
    """A daemon with one workflow, Intake, and one notification of `events` to the receiver."""

    async def start(steps: list[dict[str, Any]], events: list[str], **more: Any) -> AppClient:
        workflow = {"name": "Intake", "steps": steps, **more}
        hook = {"name": "ops", "url": receiver.url, "events": events}
        return await start_daemon(make_config(workflows=[workflow], notifications=[hook]))

    return start


async def test_the_topic_label_counts_unknown_topics_as_other(intake: Intake) -> None:
    client = await intake(
        [{"name": "note", "publish": "case.noted"}],
        ["case.closed", "grant.*"],
        trigger={"event": "case.opened"},
    )
    random_topics = [f"x{secrets.token_hex(6)}" for _ in range(50)]
    for topic in random_topics:
        await publish(client, topic, 0)
    await publish(client, "case.opened", 0)  # a trigger: starts Intake, which publishes
    await publish(client, "case.closed", 0)  # a notification's event

    async def counted() -> bool:
        families = await metric_families(client)
        samples = families["hms_events_published"].samples
        by_topic = {s.labels["topic"]: s.value for s in samples if s.name.endswith("_total")}
        return by_topic.get("case.noted") == 1 and by_topic.get("workflow.completed") == 1

    await until(counted)
    text = await (await client.get("/metrics")).text()
    assert 'hms_events_published_total{topic="other"} 50.0' in text
    for named in ("case.opened", "case.noted", "case.closed", "workflow.started"):
        assert f'hms_events_published_total{{topic="{named}"}} 1.0' in text
    assert not any(topic in text for topic in random_topics)


async def test_a_publish_step_sends_its_data_as_of_the_publish(
    intake: Intake, receiver: Receiver
) -> None:
    steps = [
        {"name": "announce", "publish": "case.announced"},  # default data: input and steps
        {"name": "close", "publish": "case.closed"},
    ]
    client = await intake(steps, ["case.announced"])
    resp = await client.post("/v1/workflows/Intake", json={"input": {"case": "C-1"}})
    assert resp.status == 202

    async def delivered() -> bool:
        return len(receiver.received) >= 1

    await until(delivered)
    data = receiver.bodies()[0]["data"]
    assert data["input"] == {"case": "C-1"}
    assert data["steps"] == {}  # not the outputs of `announce` itself or of `close`


async def audit_seen(client: AppClient, headers: dict[str, str]) -> list[str]:
    """The topics a stream opened with `headers` and `Last-Event-ID: 0` gets: the stored
    audit event replayed, one published live, then health.changed (everyone's, the end)."""
    bus = client.app[BUS]
    seen: list[str] = []
    headers = {**headers, "Last-Event-ID": "0"}
    async with client.get("/v1/events", headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"  # subscribed: live now
        bus.publish("audit.recorded", {"action": "process.cancel"})
        bus.publish("health.changed", {"service": "payments"})
        while not seen or seen[-1] != "health.changed":
            seen.append((await next_event(stream))["event"])
    return seen


async def test_audit_events_go_to_audit_readers_only_live_and_replayed(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    tokens = [
        {"name": "admin", "token": ADMIN, "scopes": ["*"]},  # `*` holds audit:read (DESIGN §3)
        {
            "name": "reader",
            "token": READER,
            "scopes": ["subscribe:*"],
        },  # every published topic, not audit
        {"name": "audit-glob-12345", "token": "audit-glob-12345", "scopes": ["subscribe:audit.*"]},
    ]
    client = await start_daemon(make_config(server={"auth": {"tokens": tokens}}))
    await client.app[ENGINE].publish("audit.recorded", {"action": "process.start"}, by="test")
    everything = ["audit.recorded", "audit.recorded", "health.changed"]
    assert await audit_seen(client, bearer(ADMIN)) == everything
    assert await audit_seen(client, bearer(READER)) == ["health.changed"]
    assert await audit_seen(client, bearer("audit-glob-12345")) == ["health.changed"]
    assert await audit_seen(client, {}) == ["health.changed"]


async def test_without_auth_everyone_reads_audit_events(daemon: AppClient) -> None:
    # No tokens: the daemon is open, everyone may do everything, the audit trail included.
    await daemon.app[ENGINE].publish("audit.recorded", {"action": "process.start"}, by="test")
    assert await audit_seen(daemon, {}) == ["audit.recorded", "audit.recorded", "health.changed"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("server:\n  sse_buffer: lots\n", "config.yaml:2: server.sse_buffer"),
        ("server:\n  sse_buffer: 1KiB\n", "config.yaml:2: server.sse_buffer"),
        ("storage:\n  event_retention: forever\n", "config.yaml:2: storage.event_retention"),
    ],
)
def test_bad_event_settings_are_config_errors_naming_key_and_line(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert error in str(caught.value)


def test_sse_buffer_takes_sizes_and_defaults_to_8_mib() -> None:
    assert parse_config("").server.sse_buffer == 8 * 1024 * 1024
    assert parse_config("server:\n  sse_buffer: 512KiB\n").server.sse_buffer == 512 * 1024


async def test_a_reader_that_keeps_up_gets_an_event_bigger_than_the_buffer(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(server={"sse_buffer": "64KiB"}))
    async with client.get("/v1/events") as stream:
        await client.post("/v1/events/case.scanned", json={"page": "x" * 200_000})
        event = await next_event(stream)
    assert len(event["data"]["data"]["page"]) == 200_000


async def a_reader_falls_behind_and_is_cut_off(client: AppClient) -> int:
    """A stream of case.* whose reader stops reading after the first event (its id, returned)
    while 300 events of 20 kB (6 MB) are published: the daemon resets its connection when
    `server.sse_buffer` (64 KiB in these tests) is passed."""
    assert client.port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(b"GET /v1/events?topics=case.* HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await publish(client, "case.noted", 0)
    async with asyncio.timeout(5):
        while f"id: {first}".encode() not in await reader.readline():
            pass
    blob = "x" * 20_000
    for n in range(1, 301):  # 6 MB: past the kernel's buffers and the 64 KiB queue
        resp = await client.post("/v1/events/case.noted", json={"n": n, "blob": blob})
        assert resp.status == 202
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(10):
            while await reader.read(1 << 16):
                pass
    writer.close()
    return first


async def test_a_reader_cut_off_for_falling_behind_resumes_from_its_last_id(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(server={"sse_buffer": "64KiB"}))
    first = await a_reader_falls_behind_and_is_cut_off(client)
    headers = {"Last-Event-ID": str(first)}
    async with client.get("/v1/events", params={"topics": "case.*"}, headers=headers) as stream:
        resumed = [(await next_event(stream))["data"]["data"]["n"] for _ in range(300)]
    assert resumed == list(range(1, 301))


async def test_a_step_that_starts_waiting_gets_live_what_a_restart_would_find(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Event 2 is stored while event 1 is still being written. A step that starts waiting
    # then takes the events with ids after the last one given out (2): event 2 was
    # published before it waited, so it is not its own, live or after a restart (events
    # after 2 in the store); event 3 is.
    wait = {"name": "Grant", "steps": [{"name": "paid", "wait_for": {"event": "grant.paid"}}]}
    client = await start_daemon(make_config(workflows=[wait]))
    store = client.app[ENGINE].store
    writing, written = asyncio.Event(), asyncio.Event()
    create = store.create

    async def slow_for_case(processes: Any, event: Any) -> Any:
        if event is not None and event.topic.startswith("case."):
            writing.set()
            await written.wait()  # a write that takes long (a busy disk) and ends later
        return await create(processes, event)

    monkeypatch.setattr(store, "create", slow_for_case)
    first = asyncio.create_task(publish(client, "case.noted", 1))
    await writing.wait()
    assert await publish(client, "grant.paid", 2) == 2
    started = await client.post("/v1/workflows/Grant", json={})
    process = f"/v1/processes/{(await started.json())['id']}"

    async def status_is(status: str) -> bool:
        return bool((await (await client.get(process)).json())["status"] == status)

    await until(lambda: status_is("waiting"))
    written.set()
    assert await first == 1
    await asyncio.sleep(0.2)  # event 2, delivered live now, would have ended the wait
    assert await status_is("waiting")
    assert await publish(client, "grant.paid", 3) == 3
    await until(lambda: status_is("completed"))
    assert (await (await client.get(process)).json())["outputs"]["paid"] == {"n": 3}
