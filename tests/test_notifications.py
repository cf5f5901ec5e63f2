"""Notifications delivered to a real webhook receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families, until
from .services import Receiver
from .test_checker import FAST, health, register, state_is

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

SECRET = "hook-secret"


def notification(receiver: Receiver, events: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "ops",
        "url": receiver.url,
        "events": events,
        "secret": SECRET,
        "retry": {"max_attempts": 4, "backoff": "20ms", "max_backoff": "50ms"},
        **extra,
    }


async def received(receiver: Receiver, count: int) -> None:
    async def enough() -> bool:
        return len(receiver.received) >= count

    await until(enough)


async def counts(client: AppClient) -> dict[str, float]:
    families = await metric_families(client)
    return {
        s.labels["result"]: s.value
        for s in families["hms_notifications"].samples
        if s.name == "hms_notifications_total"
    }


@pytest.fixture
def grant_daemon(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    receiver: Receiver,
) -> Callable[..., Awaitable[AppClient]]:
    """A daemon whose one notification sends grant.* events to the receiver."""

    async def start(**extra: Any) -> AppClient:
        return await start_daemon(
            make_config(notifications=[notification(receiver, ["grant.*"], **extra)])
        )

    return start


async def counted(client: AppClient, result: str, value: float, *, at_least: bool = False) -> None:
    async def reached() -> bool:
        count = (await counts(client)).get(result, 0)
        return count >= value if at_least else count == value

    await until(reached)


async def publish(client: AppClient, topic: str, data: dict[str, Any]) -> None:
    resp = await client.post(f"/v1/events/{topic}", json=data)
    assert resp.status == 202, await resp.text()


async def test_health_change_is_posted_signed_with_what_failed(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    receiver: Receiver,
) -> None:
    client = await start_daemon(
        make_config(
            defaults={"probe": {"type": "http", **FAST}},
            notifications=[notification(receiver, ["health.changed"])],
        )
    )
    await register(client, target)
    await state_is(client, "passing")
    async with aiohttp.ClientSession() as http:
        await http.post(target.make_url("/status/503"))
    await state_is(client, "critical")

    async def critical_sent() -> bool:
        return any(b["data"]["to"] == "critical" for b in receiver.bodies())

    await until(critical_sent)
    headers, body = next(
        (h, b) for h, b in receiver.received if json.loads(b)["data"]["to"] == "critical"
    )
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Hms-Signature"] == f"sha256={expected}"
    assert headers["X-Hms-Event"] == "health.changed"
    payload = json.loads(body)
    assert payload["notification"] == "ops"
    assert payload["subject"] == "payments/p1"
    assert payload["summary"].startswith("payments/p1 is critical (was passing)")
    assert payload["data"]["failing"][0]["condition"] == "[STATUS] < 400"
    assert (await counts(client))["sent"] >= 1


async def test_slack_format_sends_text(
    grant_daemon: Callable[..., Awaitable[AppClient]], receiver: Receiver
) -> None:
    client = await grant_daemon(format="slack")
    await publish(client, "grant.paid", {"process": "p-1", "amount": 100})
    await received(receiver, 1)
    assert receiver.bodies() == [{"text": "[hms-mgmt] grant.paid p-1"}]


async def test_failed_deliveries_are_retried_until_the_receiver_answers(
    grant_daemon: Callable[..., Awaitable[AppClient]], receiver: Receiver
) -> None:
    receiver.statuses = [503, 500]
    client = await grant_daemon()
    await publish(client, "grant.paid", {"process": "p-1"})
    await received(receiver, 3)
    delivery_ids = {h["X-Hms-Delivery"] for h, _ in receiver.received}
    assert len(delivery_ids) == 1  # the same delivery, three attempts

    await counted(client, "sent", 1)
    assert (await counts(client))["retried"] == 2


async def test_a_client_error_is_not_retried(
    grant_daemon: Callable[..., Awaitable[AppClient]], receiver: Receiver
) -> None:
    receiver.statuses = [400]
    client = await grant_daemon()
    await publish(client, "grant.paid", {"process": "p-1"})

    await counted(client, "failed", 1)
    assert len(receiver.received) == 1


async def test_undelivered_notifications_survive_a_restart(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    receiver.statuses = [503]
    slow = notification(receiver, ["grant.*"])
    slow["retry"] = {"max_attempts": 5, "backoff": "1h", "max_backoff": "1h"}
    config = make_config(notifications=[slow])
    first = await start_daemon(config)
    await publish(first, "grant.paid", {"process": "p-1"})

    async def retry_scheduled() -> bool:
        return (await counts(first)).get("retried") == 1

    await until(retry_scheduled)
    await first.close()

    clock.advance(3600)  # the stored retry is now due
    await start_daemon(config)
    await received(receiver, 2)
    (first_headers, first_body), (second_headers, second_body) = receiver.received
    assert second_headers["X-Hms-Delivery"] == first_headers["X-Hms-Delivery"]
    assert second_body == first_body


async def test_same_state_within_min_interval_is_sent_once(
    grant_daemon: Callable[..., Awaitable[AppClient]], receiver: Receiver
) -> None:
    client = await grant_daemon(min_interval="1h")
    for _ in range(3):
        await publish(client, "grant.paid", {"process": "p-1", "amount": 100})
    await received(receiver, 1)

    await counted(client, "deduped", 2)
    assert len(receiver.received) == 1


async def test_a_changed_state_goes_out_at_once(
    grant_daemon: Callable[..., Awaitable[AppClient]], receiver: Receiver
) -> None:
    client = await grant_daemon(min_interval="1h")
    for step in ("validated", "validated", "paid"):
        await publish(client, "grant.progress", {"process": "p-1", "step": step})
    await received(receiver, 2)
    assert [b["data"]["step"] for b in receiver.bodies()] == ["validated", "paid"]
    assert (await counts(client))["deduped"] == 1


async def test_no_notifications_during_maintenance(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    receiver: Receiver,
) -> None:
    # The fake wall clock reads 2027-01-15T08:00:00Z; the window covers it.
    window = {"services": ["payments"], "at": "2027-01-15T07:30:00Z", "duration": "1h"}
    client = await start_daemon(
        make_config(
            defaults={"probe": {"type": "http", **FAST}},
            maintenance=[window],
            notifications=[notification(receiver, ["health.changed", "grant.*"])],
        )
    )
    await register(client, target)
    await state_is(client, "maintenance")
    await publish(client, "grant.paid", {"service": "payments", "process": "p-1"})
    await publish(client, "grant.paid", {"service": "ledger", "process": "p-2"})
    await received(receiver, 1)  # only the event about a service outside the window
    assert [b["data"].get("process") for b in receiver.bodies()] == ["p-2"], receiver.bodies()
    assert (await counts(client))["suppressed"] >= 2


async def test_dependency_suppressed_instances_do_not_notify(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    receiver: Receiver,
) -> None:
    client = await start_daemon(
        make_config(
            defaults={"probe": {"type": "http", **FAST}},
            services=[{"name": "ledger"}, {"name": "payments", "depends_on": ["ledger"]}],
            notifications=[notification(receiver, ["health.changed"])],
        )
    )
    failing = {"url": str(target.make_url("/")), "probe": {"path": "/fail"}}
    resp = await client.put("/v1/services/ledger/instances/l1", json=failing)
    assert resp.status == 201

    async def ledger_critical_sent() -> bool:
        return any(b["subject"] == "ledger/l1" for b in receiver.bodies())

    await until(ledger_critical_sent)
    resp = await client.put("/v1/services/payments/instances/p1", json=failing)
    assert resp.status == 201
    await state_is(client, "critical")  # payments/p1 fails too, while ledger is down
    assert (await health(client))["suppressed"] is True
    await counted(client, "suppressed", 1, at_least=True)
    assert [b["subject"] for b in receiver.bodies()] == ["ledger/l1"]
