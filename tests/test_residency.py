"""Processes waiting beyond the engine's horizon wait as rows, not in memory (issue 17
item 5): their timers still fire, and a cancel, a signal or a matching event brings them
back. The daemon's clock is the tests' fake one: an hour passes when a test says so. The
horizon is shortened so the loop reading rows due turns often (bench/cluster.py measures
how close to due a timer fires)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.keys import ENGINE
from registry import StoreUnavailable
from workflows.residency import FORGET_LEFT, Residency

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families, until
from .services import Calls

STORES = BOTH_STORES
HORIZON = 0.4

RESERVE = {
    "name": "reserve",
    "call": {"service": "ach", "path": "/reserve"},
    "compensate": {"service": "ach", "path": "/release"},
}
TIMED = {
    "name": "Timed",
    "steps": [
        RESERVE,
        {"name": "after", "delay": "1h", "call": {"service": "ach", "path": "/after"}},
    ],
}
SIGNALLED = {
    "name": "Signalled",
    "steps": [
        {"name": "docs", "wait_for": {"signal": "go", "timeout": "2h"}},
        {"name": "approve", "call": {"service": "ach", "path": "/approve"}},
    ],
}
EVENTED = {
    "name": "Evented",
    "steps": [
        {
            "name": "settled",
            "wait_for": {"event": "payment.settled", "match": {"grant": "{input.grant}"}},
        },
        {"name": "record", "call": {"service": "ach", "path": "/record"}},
    ],
}
LATE = {
    "name": "Late",
    "deadline": "1s",
    "steps": [{"name": "later", "delay": "1h", "call": {"service": "ach", "path": "/later"}}],
}
WORKFLOWS = [TIMED, SIGNALLED, EVENTED, LATE]


@pytest.fixture
async def daemon(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> AppClient:
    client = await start_daemon(make_config(workflows=WORKFLOWS))
    engine = client.app[ENGINE]
    await engine.close()  # the horizon is read at open
    engine.horizon = HORIZON
    await engine.open()
    resp = await client.put(
        "/v1/services/ach/instances/i1", json={"url": str(service.make_url("/"))}
    )
    assert resp.status in (200, 201), await resp.text()
    return client


async def start(client: AppClient, name: str, input_: dict[str, Any] | None = None) -> str:
    resp = await client.post(f"/v1/workflows/{name}", json={"input": input_ or {}})
    assert resp.status == 202, await resp.text()
    process_id: str = (await resp.json())["id"]
    return process_id


async def process(client: AppClient, process_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200, await resp.text()
    found: dict[str, Any] = await resp.json()
    return found


async def in_memory(client: AppClient) -> float:
    families = await metric_families(client)
    return families["hms_workflow_processes_in_memory"].samples[0].value


async def all_rows(client: AppClient, count: int) -> None:
    """Wait until no process is in memory while `count` wait (each at its wait)."""

    async def parked() -> bool:
        resp = await client.get("/v1/processes?status=waiting")
        waiting = (await resp.json())["processes"]
        return len(waiting) == count and await in_memory(client) == 0

    await until(parked)


async def finished(client: AppClient, process_id: str, status: str = "completed") -> None:
    async def done() -> bool:
        return (await process(client, process_id))["status"] == status

    await until(done)


async def test_a_timer_beyond_the_horizon_waits_as_a_row_and_fires_when_due(
    daemon: AppClient, calls: Calls, clock: FakeClock
) -> None:
    ids = [await start(daemon, "Timed") for _ in range(5)]
    await all_rows(daemon, 5)
    view = await process(daemon, ids[0])
    assert view["waiting_for"]["kind"] == "delay", view  # the API shows the row as it waits
    clock.advance(3599)
    await asyncio.sleep(0.3)  # the loop turns every 33 ms: one second early, none is back
    assert await in_memory(daemon) == 0
    assert calls.keys("/after") == []

    clock.advance(1)
    for process_id in ids:
        await finished(daemon, process_id)
    assert sorted(calls.keys("/after")) == sorted(f"{p}/after" for p in ids)  # once each
    history = (await process(daemon, ids[0]))["history"]
    assert [line["step"] for line in history] == ["reserve", "after"]
    assert await in_memory(daemon) == 0


async def test_a_cancel_reaches_a_process_waiting_as_a_row(
    daemon: AppClient, calls: Calls, clock: FakeClock
) -> None:
    process_id = await start(daemon, "Timed")
    await all_rows(daemon, 1)
    resp = await daemon.post(f"/v1/processes/{process_id}/cancel")
    assert resp.status == 202, await resp.text()
    await finished(daemon, process_id, "cancelled")
    assert calls.keys("/release") == [f"{process_id}/reserve.compensate"]  # undone
    clock.advance(3600)  # past its timer: the step it was waiting for never runs
    await asyncio.sleep(0.3)
    assert calls.keys("/after") == []


async def test_a_signal_reaches_a_process_waiting_as_a_row(daemon: AppClient, calls: Calls) -> None:
    process_id = await start(daemon, "Signalled")
    await all_rows(daemon, 1)
    resp = await daemon.post(f"/v1/processes/{process_id}/signals/go", json={"ok": True})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, process_id)
    view = await process(daemon, process_id)
    assert view["outputs"]["docs"] == {"ok": True}
    assert calls.keys("/approve") == [f"{process_id}/approve"]


async def test_an_event_wakes_only_the_rows_its_match_accepts(
    daemon: AppClient, calls: Calls
) -> None:
    first = await start(daemon, "Evented", {"grant": "g-1"})
    second = await start(daemon, "Evented", {"grant": "g-2"})
    await all_rows(daemon, 2)

    resp = await daemon.post("/v1/events/payment.settled", json={"grant": "g-2", "amount": 5})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, second)
    assert (await process(daemon, second))["outputs"]["settled"]["amount"] == 5
    await all_rows(daemon, 1)  # the other is back to a row, still waiting for its own
    assert (await process(daemon, first))["status"] == "waiting"
    assert calls.keys("/record") == [f"{second}/record"]


async def test_a_deadline_fires_for_a_process_waiting_as_a_row(
    daemon: AppClient, clock: FakeClock
) -> None:
    process_id = await start(daemon, "Late")
    await all_rows(daemon, 1)
    clock.advance(1)

    async def missed() -> bool:
        return bool((await process(daemon, process_id))["deadline_missed"])

    await until(missed)
    await all_rows(daemon, 1)  # due by its timer alone now: an hour away
    assert (await process(daemon, process_id))["status"] == "waiting"


async def test_after_a_restart_only_processes_due_come_back_and_their_timers_fire(
    daemon: AppClient, calls: Calls, clock: FakeClock
) -> None:
    timed = [await start(daemon, "Timed") for _ in range(3)]
    signalled = await start(daemon, "Signalled")
    await all_rows(daemon, 4)
    engine = daemon.app[ENGINE]
    await engine.close()
    await engine.open()
    assert await in_memory(daemon) == 0  # none due within the horizon at open
    clock.advance(3600)
    for process_id in timed:
        await finished(daemon, process_id)
    assert sorted(calls.keys("/after")) == sorted(f"{p}/after" for p in timed)
    resp = await daemon.post(f"/v1/processes/{signalled}/signals/go", json={})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, signalled)


async def test_a_synchronous_start_waits_on_through_its_process_waiting_as_a_row(
    daemon: AppClient, clock: FakeClock
) -> None:
    answer = asyncio.ensure_future(daemon.post("/v1/workflows/Timed?wait=10s", json={"input": {}}))
    await all_rows(daemon, 1)
    assert not answer.done()
    clock.advance(3600)
    resp = await answer
    assert resp.status == 200, await resp.text()  # it ended within the wait, as a row between
    assert (await resp.json())["status"] == "completed"


# -- races (each held open by wrapping a real store call) -----------------------------


async def test_an_event_published_as_a_wait_begins_is_not_its_and_the_next_reaches_it(
    daemon: AppClient,
) -> None:
    """An event whose publish began before the wait is not the wait's (it takes ids after
    it); the next one reaches it though it parked while the first was being written."""
    engine = daemon.app[ENGINE]
    store, create = engine.store, engine.store.create
    gate = asyncio.Event()

    async def held(processes: Any, event: Any, **kw: Any) -> Any:
        if event is not None and not gate.is_set():
            await gate.wait()
        return await create(processes, event, **kw)

    store.create = held  # type: ignore[method-assign]
    try:
        first = asyncio.ensure_future(
            engine.publish("payment.settled", {"grant": "g-1", "n": 1}, by="test")
        )
        await asyncio.sleep(0.05)  # reserved, being written
        waiter = await start(daemon, "Evented", {"grant": "g-1"})
        await all_rows(daemon, 1)
        gate.set()
        assert await first is not None
    finally:
        store.create = create  # type: ignore[method-assign]
    await asyncio.sleep(0.2)
    assert (await process(daemon, waiter))["status"] == "waiting"
    resp = await daemon.post("/v1/events/payment.settled", json={"grant": "g-1", "n": 2})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, waiter)
    assert (await process(daemon, waiter))["outputs"]["settled"]["n"] == 2


async def test_a_store_blip_after_an_events_write_leaves_no_waiter_behind(
    daemon: AppClient, clock: FakeClock
) -> None:
    engine = daemon.app[ENGINE]
    waiter = await start(daemon, "Evented", {"grant": "g-1"})
    timed = await start(daemon, "Timed")
    await all_rows(daemon, 2)
    clock.advance(3600)  # the loop reads the timer's row: its cursor passes now
    await finished(daemon, timed)
    store, waiters = engine.store, engine.store.waiters

    async def blip(*args: Any) -> Any:
        raise StoreUnavailable("connection reset")

    store.waiters = blip  # type: ignore[method-assign]
    try:
        resp = await daemon.post("/v1/events/payment.settled", json={"grant": "g-1"})
        assert resp.status in (200, 202), await resp.text()  # stored: that is what it says
    finally:
        store.waiters = waiters  # type: ignore[method-assign]
    await finished(daemon, waiter)  # its row is due (the event's write): the loop reads it


async def test_a_signal_for_a_later_step_leaves_the_process_a_row(daemon: AppClient) -> None:
    waiter = await start(daemon, "Signalled")
    await all_rows(daemon, 1)
    resp = await daemon.post(f"/v1/processes/{waiter}/signals/other", json={})
    assert resp.status in (200, 202), await resp.text()
    await all_rows(daemon, 1)  # still waiting for "go", two hours away: a row again
    resp = await daemon.post(f"/v1/processes/{waiter}/signals/go", json={})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, waiter)


async def test_an_event_equal_to_a_waiting_rows_match_reaches_it(daemon: AppClient) -> None:
    waiter = await start(daemon, "Evented", {"grant": 5})
    await all_rows(daemon, 1)
    resp = await daemon.post("/v1/events/payment.settled", json={"grant": 5.0})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, waiter)  # 5.0 == 5, as for a waiter in memory


async def test_a_load_straddling_a_close_and_open_runs_one_copy(
    daemon: AppClient, calls: Calls
) -> None:
    engine = daemon.app[ENGINE]
    waiter = await start(daemon, "Signalled")
    await all_rows(daemon, 1)
    store, unfinished_of = engine.store, engine.store.unfinished_of
    gate, reading = asyncio.Event(), asyncio.Event()

    async def held(ids: Any, owner: Any = None) -> Any:
        if not gate.is_set():
            reading.set()
            await gate.wait()
        return await unfinished_of(ids, owner)

    store.unfinished_of = held  # type: ignore[method-assign]
    try:
        old = asyncio.ensure_future(daemon.post(f"/v1/processes/{waiter}/signals/other", json={}))
        async with asyncio.timeout(10):
            await reading.wait()  # the old term's load is reading
        await engine.close()  # leadership lost and won back
        gate.set()
        await engine.open()
        await old
    finally:
        store.unfinished_of = unfinished_of  # type: ignore[method-assign]
    resp = await daemon.post(f"/v1/processes/{waiter}/signals/go", json={})
    assert resp.status in (200, 202), await resp.text()
    await finished(daemon, waiter)
    assert calls.keys("/approve") == [f"{waiter}/approve"]  # one copy went on past the signal

    async def no_copy_left() -> bool:
        # Its task may still be ending when its status reads completed (its last
        # checkpoint commits before it returns); a second copy would wait for its signal.
        return not [t for t in asyncio.all_tasks() if t.get_name() == f"process:{waiter}"]

    await until(no_copy_left, 5)
    history = (await process(daemon, waiter))["history"]
    assert [line["step"] for line in history] == ["docs", "approve"]  # each once


def test_departures_are_remembered_for_a_while_then_dropped_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the module reads time.monotonic
    memory = Residency(
        cast(Any, None), clock=lambda: now[0], live={}, creating=(), spawn=lambda _: None
    )
    for n in range(50_000):  # a sustained 1,000 finishes a second for 50 s
        memory.left(f"p{n}")
        now[0] += 0.001
    began = 1000.0 + 49.0  # a read that began a second before the last departure
    assert memory.left_after("p49999", began)
    assert not memory.left_after("p48000", began)  # left before that read began
    memory.left("p0")  # p0 leaves again (it parked, came back, finished)
    now[0] += FORGET_LEFT - 1
    memory.left("p-late")
    assert memory.left_after("p0", began)  # its second departure is still remembered
    assert memory.left_after("p-late", began)
    assert memory.left_after("p49500", 0)  # 59.5 s ago
    assert not memory.left_after("p48000", 0)  # 61 s ago: forgotten
    assert len(memory._left) == 1002  # the last second's 1,000, p0 again and p-late
