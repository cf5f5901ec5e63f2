"""A leader paused past its lease wakes with its timers overdue: before its engine closes,
nothing may leave it (DESIGN §8: a step runs twice only after a replica died mid-step).
Two daemons on one PostgreSQL database; their leadership is set by hand, as a paused
replica's own clock would say it (no callback has told it yet)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.app import build_app
from monitor.config import Config

from .conftest import AppClient, FakeClock, until
from .services import Calls
from .test_forward import Leader

STORES = ("postgres",)
DELAYED = {
    "name": "Delayed",
    "steps": [
        {"name": "before", "call": {"service": "ach", "path": "/before"}},
        {"name": "after", "delay": "1500ms", "call": {"service": "ach", "path": "/after"}},
    ],
}


async def test_a_deposed_leader_does_not_call_the_step_its_successor_runs(
    make_config: Callable[..., Config],
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
    service: TestServer,
    calls: Calls,
) -> None:
    config = make_config(workflows=[DELAYED])

    async def replica(leadership: Leader) -> AppClient:
        app = build_app(config, clock=clock, metrics=CollectorRegistry(), leadership=leadership)
        return await aiohttp_client(app)

    old_lead = Leader(True)
    old = await replica(old_lead)
    resp = await old.put("/v1/services/ach/instances/i1", json={"url": str(service.make_url("/"))})
    assert resp.status == 201, await resp.text()
    resp = await old.post("/v1/workflows/Delayed", json={"input": {}})
    assert resp.status == 202, await resp.text()
    process = (await resp.json())["id"]

    async def called(path: str) -> bool:
        return bool(calls.keys(path))

    await until(lambda: called("/before"))
    # Its lease is over by its own clock; no renewal has said so yet (it was paused).
    old_lead.is_leader = False
    await replica(Leader(True))  # the successor takes every process over and runs them
    await until(lambda: called("/after"))
    await asyncio.sleep(2.0)  # past the old one's overdue timer
    assert calls.keys("/after") == [f"{process}/after"]  # the successor's call alone
