"""Blocking queries on a service, and what a daemon restart keeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from monitor.config import Config

from .conftest import BOTH_STORES, AppClient, FakeClock
from .test_registry import PAYMENTS_1, instance, listed_instance, register

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL


async def test_blocking_query_wakes_on_change(daemon: AppClient) -> None:
    await register(daemon)
    first = await daemon.get("/v1/services/payments")
    index = int(first.headers["X-Registry-Index"])

    waiting = asyncio.create_task(
        daemon.get("/v1/services/payments", params={"index": str(index), "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await register(daemon, "/v1/services/payments/instances/payments-2")

    resp = await asyncio.wait_for(waiting, 5)
    assert int(resp.headers["X-Registry-Index"]) > index
    assert len((await resp.json())["instances"]) == 2


async def test_blocking_query_times_out_with_the_same_index(daemon: AppClient) -> None:
    await register(daemon)
    first = await daemon.get("/v1/services/payments")
    index = first.headers["X-Registry-Index"]
    resp = await daemon.get("/v1/services/payments", params={"index": index, "wait": "100ms"})
    assert resp.status == 200
    assert resp.headers["X-Registry-Index"] == index


async def test_blocking_query_ignores_changes_to_other_services(daemon: AppClient) -> None:
    await register(daemon)
    index = (await daemon.get("/v1/services/payments")).headers["X-Registry-Index"]
    waiting = asyncio.create_task(
        daemon.get("/v1/services/payments", params={"index": index, "wait": "300ms"})
    )
    await asyncio.sleep(0.05)
    await register(daemon, "/v1/services/ach/instances/ach-1")
    resp = await waiting
    assert resp.headers["X-Registry-Index"] == index


async def test_blocking_query_wakes_when_a_lease_lapses(
    daemon: AppClient, clock: FakeClock
) -> None:
    await register(daemon, ttl="10s")
    index = (await daemon.get("/v1/services/payments")).headers["X-Registry-Index"]
    waiting = asyncio.create_task(
        daemon.get("/v1/services/payments", params={"index": index, "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    clock.advance(10)  # the reaper looks at least once a second
    resp = await asyncio.wait_for(waiting, 5)
    assert (await resp.json())["instances"][0]["health"] == "critical"


async def test_index_from_the_future_returns_at_once(daemon: AppClient) -> None:
    await register(daemon)
    resp = await asyncio.wait_for(
        daemon.get("/v1/services/payments", params={"index": "999999", "wait": "10m"}), 5
    )
    assert resp.status == 200
    assert int(resp.headers["X-Registry-Index"]) < 999999


async def test_restart_keeps_registrations(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = make_config()
    first = await start_daemon(config)
    await register(first, tags=["a"], meta={"k": "v"}, ttl="30s")
    await register(first, "/v1/services/ach/instances/ach-1")
    await first.delete("/v1/services/ach/instances/ach-1")
    index = int((await first.get("/v1/services")).headers["X-Registry-Index"])
    await first.close()

    second = await start_daemon(config)
    listed = await listed_instance(second)
    assert (listed["tags"], listed["meta"], listed["ttl"]) == (["a"], {"k": "v"}, "30s")
    assert await instance(second, "ach", "ach-1") is None
    assert int((await second.get("/v1/services")).headers["X-Registry-Index"]) > index


async def test_restart_grants_every_lease_a_fresh_ttl(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    config = make_config()
    first = await start_daemon(config)
    await register(first, ttl="30s")
    clock.advance(25)
    await first.close()

    clock.advance(60)  # the daemon was down for a minute: the lease is long past due
    second = await start_daemon(config)
    clock.advance(29)
    listed = await listed_instance(second)
    assert listed["health"] == "unknown"
    clock.advance(1)
    listed = await listed_instance(second)
    assert listed["health"] == "critical"


async def test_heartbeat_is_not_needed_to_survive_restart_without_ttl(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = make_config()
    first = await start_daemon(config)
    await register(first)
    await first.close()
    second = await start_daemon(config)
    resp = await second.put(PAYMENTS_1, json={"url": "http://127.0.0.1:8001"})
    assert resp.status == 200  # an update, not a second instance
