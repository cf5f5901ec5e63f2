"""The workflow engine closed and opened again on the same object (a replica that loses
leadership and wins it back): processes mid-flight finish once, from the store alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.keys import ENGINE

from .conftest import AppClient, metric_families, until
from .services import Calls

DELAYED = {
    "name": "Delayed",
    "steps": [
        {"name": "before", "call": {"service": "ach", "path": "/before"}},
        {"name": "after", "delay": "400ms", "call": {"service": "ach", "path": "/after"}},
    ],
}
SIGNALLED = {
    "name": "Signalled",
    "steps": [
        {"name": "docs", "wait_for": {"signal": "go", "timeout": "1h"}},
        {"name": "approve", "call": {"service": "ach", "path": "/approve"}},
    ],
}
TASKED = {
    "name": "Tasked",
    "queue": "work",
    "steps": [
        {"name": "work", "task": "doWork", "timeout": "1h"},
        {"name": "record", "call": {"service": "ach", "path": "/record"}},
    ],
}


@pytest.fixture
async def daemon(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> AppClient:
    client = await start_daemon(make_config(workflows=[DELAYED, SIGNALLED, TASKED]))
    url = str(service.make_url("/"))
    resp = await client.put("/v1/services/ach/instances/i1", json={"url": url})
    assert resp.status in (200, 201), await resp.text()
    return client


async def start(client: AppClient, name: str) -> str:
    resp = await client.post(f"/v1/workflows/{name}", json={"input": {}})
    assert resp.status == 202, await resp.text()
    process_id: str = (await resp.json())["id"]
    return process_id


async def status(client: AppClient, process_id: str) -> str:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200, await resp.text()
    found: str = (await resp.json())["status"]
    return found


async def take_task(client: AppClient) -> dict[str, Any]:
    resp = await client.post("/v1/tasks/poll", json={"queue": "work", "wait": "5s", "max": 1})
    assert resp.status == 200, await resp.text()
    [task] = (await resp.json())["tasks"]
    assert task["task"] == "doWork", task
    return dict(task)


async def completed_count(client: AppClient, workflow: str) -> float:
    families = await metric_families(client)
    return sum(
        s.value
        for s in families["hms_workflow_processes"].samples
        if s.labels.get("workflow") == workflow and s.labels.get("status") == "completed"
    )


async def test_processes_mid_flight_finish_once_after_close_and_open(
    daemon: AppClient, calls: Calls
) -> None:
    names = ("Delayed", "Signalled", "Tasked")
    delayed, signalled, tasked = [await start(daemon, name) for name in names]
    task = await take_task(daemon)  # claimed by a worker in the first term

    async def delaying() -> bool:
        return bool(calls.keys("/before"))

    await until(delaying)
    engine = daemon.app[ENGINE]
    await engine.close()
    await asyncio.sleep(0.6)  # past the delay: a closed engine does not run it
    assert calls.keys("/after") == []
    assert await status(daemon, delayed) != "completed"
    resp = await daemon.post(f"/v1/processes/{signalled}/signals/go", json={})
    assert resp.status == 503, await resp.text()  # not running here: send it again

    await engine.open()
    resp = await daemon.post(f"/v1/processes/{signalled}/signals/go", json={})
    assert resp.status in (200, 202), await resp.text()
    resp = await daemon.post(f"/v1/tasks/{task['id']}/complete", json={"output": {"done": 1}})
    assert resp.status == 200, await resp.text()

    async def all_completed() -> bool:
        return all([await status(daemon, p) == "completed" for p in (delayed, signalled, tasked)])

    await until(all_completed)
    await asyncio.sleep(0.1)  # a second run of any step would have called by now
    assert calls.keys("/before") == [f"{delayed}/before"]
    assert calls.keys("/after") == [f"{delayed}/after"]
    assert calls.keys("/approve") == [f"{signalled}/approve"]
    assert calls.keys("/record") == [f"{tasked}/record"]
    for workflow in ("Delayed", "Signalled", "Tasked"):  # counted once, not once a term
        assert await completed_count(daemon, workflow) == 1


async def test_counts_and_new_processes_carry_on_after_reopening(
    daemon: AppClient, calls: Calls
) -> None:
    async def run_one() -> str:
        process_id = await start(daemon, "Delayed")

        async def done() -> bool:
            return await status(daemon, process_id) == "completed"

        await until(done)
        return process_id

    first = await run_one()
    engine = daemon.app[ENGINE]
    for _ in range(2):
        await engine.close()
        await engine.open()
    second = await run_one()
    assert calls.keys("/after") == [f"{first}/after", f"{second}/after"]
    assert await completed_count(daemon, "Delayed") == 2  # read again, not added again
