"""Resources and `acquire`: capacities held by processes, FIFO waiters, across kill -9.

Every process here calls a real HTTP service that records how many processes are inside
their step at once (by Idempotency-Key, so a call cut off by a kill and made again after
the restart counts once), against a real daemon on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor import build_app
from monitor.config import Config, ConfigError, parse_config
from monitor.keys import PARTS
from workflows.records import Process

from .conftest import AppClient, metric_families, until
from .processes import running_daemon


@dataclass
class Lanes:
    """A service whose `/work` calls count as "inside the step" until they answer;
    `gate` closed holds every call there (the holders), open lets them through."""

    inside: Counter[str] = field(default_factory=Counter)  # idempotency key -> open calls
    most: int = 0  # the most distinct processes inside at once
    order: list[int] = field(default_factory=list)  # `n` of each process's first call
    calls: list[int] = field(default_factory=list)  # `n` of every call
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    pause: float = 0.03

    def app(self) -> web.Application:
        async def work(request: web.Request) -> web.Response:
            key = request.headers.get("Idempotency-Key", "")
            body = await request.json()
            if key not in self.inside and body["n"] not in self.order:
                self.order.append(body["n"])
            self.calls.append(body["n"])
            self.inside[key] += 1
            self.most = max(self.most, len(+self.inside))
            try:
                await self.gate.wait()
                await asyncio.sleep(self.pause)
            finally:
                self.inside[key] -= 1
            return web.json_response({"n": body["n"]})

        app = web.Application()
        app.router.add_post("/work", work)
        return app


@pytest.fixture
async def lanes() -> AsyncIterator[tuple[Lanes, str]]:
    state = Lanes()
    server = TestServer(state.app(), host="127.0.0.1")
    await server.start_server()
    yield state, str(server.make_url("/"))
    await server.close()


def contended(capacity: int = 2, *, key: str | None = None, units: int = 1) -> dict[str, Any]:
    acquire: dict[str, Any] = {"resource": "lanes", "units": units}
    if key is not None:
        acquire["key"] = key
    return {
        "resources": [{"name": "lanes", "capacity": capacity}],
        "workflows": [
            {
                "name": "Contended",
                "steps": [
                    {
                        "name": "work",
                        "acquire": acquire,
                        "call": {"service": "lanes", "path": "/work", "body": {"n": "{input.n}"}},
                    }
                ],
            },
            {
                "name": "Parked",  # holds its units until signalled
                "steps": [
                    {"name": "park", "acquire": acquire, "wait_for": {"signal": "go"}},
                ],
            },
        ],
    }


@pytest.fixture
def real_daemon(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> Callable[[Config], Awaitable[AppClient]]:
    """The daemon on the system clock: history times show the order of grants."""

    async def start(config: Config) -> AppClient:
        return await aiohttp_client(build_app(config, metrics=CollectorRegistry()))

    return start


async def started(client: AppClient, workflow: str, data: dict[str, Any]) -> str:
    resp = await client.post(f"/v1/workflows/{workflow}", json={"input": data})
    assert resp.status == 202, await resp.text()
    process_id: str = (await resp.json())["id"]
    return process_id


async def described(client: AppClient, process_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def reaches(client: AppClient, process_id: str, *statuses: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await described(client, process_id))
        return seen["status"] in statuses

    await until(reached)
    return seen


async def gauges(client: AppClient) -> tuple[dict[str, float], dict[str, float]]:
    families = await metric_families(client)
    in_use = {s.labels["resource"]: s.value for s in families["hms_resource_in_use"].samples}
    waiting = {s.labels["resource"]: s.value for s in families["hms_resource_waiting"].samples}
    return in_use, waiting


async def test_ten_processes_share_two_units_in_fifo_order(
    make_config: Callable[..., Config],
    real_daemon: Callable[[Config], Awaitable[AppClient]],
    lanes: tuple[Lanes, str],
) -> None:
    service, url = lanes
    config = make_config(
        services=[{"name": "lanes", "instances": [{"id": "l1", "url": url}]}], **contended(2)
    )
    client = await real_daemon(config)
    ids = [await started(client, "Contended", {"n": n}) for n in range(10)]
    await until(lambda: _gauges_equal(client, ({"lanes": 2}, {"lanes": 8})))
    service.gate.set()  # the two holders answer, and each release lets the next one in
    done = [await reaches(client, i, "completed", "failed") for i in ids]
    assert {d["status"] for d in done} == {"completed"}
    assert service.most == 2
    assert service.order[:2] == [0, 1]
    starts = [d["history"][0]["started_at"] for d in done]  # each step's start: its grant
    assert starts == sorted(starts)
    assert await gauges(client) == ({"lanes": 0}, {"lanes": 0})
    families = await metric_families(client)
    [count] = [
        s.value for s in families["hms_resource_grant_seconds"].samples if s.name.endswith("_count")
    ]
    assert count == 8  # each waiter's handover was timed


async def _gauges_equal(
    client: AppClient, expected: tuple[dict[str, float], dict[str, float]]
) -> bool:
    return await gauges(client) == expected


async def test_a_later_small_request_does_not_overtake_an_earlier_large_one(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = make_config(**contended(2))
    client = await start_daemon(config)
    first = await started(client, "Parked", {})  # 1 of 2 units
    await reaches(client, first, "waiting")
    big = {
        "name": "Big",
        "steps": [{"name": "park", "acquire": {"resource": "lanes", "units": 2}, "publish": "x"}],
    }
    assert (await client.put("/v1/workflows/Big", json=big)).status == 201
    large = await started(client, "Big", {})
    small = await started(client, "Parked", {})  # 1 unit is free, but Big came first
    waiting = await reaches(client, small, "waiting")
    assert waiting["waiting_for"] == {"kind": "resource", "until": None, "detail": "lanes: 1 ahead"}
    assert (await described(client, large))["waiting_for"]["detail"] == "lanes: 0 ahead"
    assert await gauges(client) == ({"lanes": 1}, {"lanes": 2})

    await client.post(f"/v1/processes/{first}/signals/go", json={})
    assert (await reaches(client, large, "completed"))["status"] == "completed"
    held = await reaches(client, small, "waiting")
    assert held["waiting_for"]["kind"] == "signal"  # it holds its unit now, parked


async def test_the_capacity_applies_per_key(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(1, key="{input.parent}")))
    a1 = await started(client, "Parked", {"parent": "P-1"})
    a2 = await started(client, "Parked", {"parent": "P-1"})
    b1 = await started(client, "Parked", {"parent": "P-2"})
    assert (await reaches(client, a1, "waiting"))["waiting_for"]["kind"] == "signal"
    assert (await reaches(client, b1, "waiting"))["waiting_for"]["kind"] == "signal"
    queued = await reaches(client, a2, "waiting")
    assert queued["waiting_for"]["detail"] == "lanes key P-1: 0 ahead"
    assert await gauges(client) == ({"lanes": 2}, {"lanes": 1})

    await client.post(f"/v1/processes/{a1}/signals/go", json={})
    await reaches(client, a1, "completed")
    await until(lambda: _waits_for(client, a2, "signal"))


async def _waits_for(client: AppClient, process_id: str, kind: str) -> bool:
    waiting = (await described(client, process_id))["waiting_for"]
    return waiting is not None and waiting["kind"] == kind


async def test_a_cancel_while_waiting_leaves_the_queue(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(1)))
    holder = await started(client, "Parked", {})
    await reaches(client, holder, "waiting")
    cancelled = await started(client, "Parked", {})
    await until(lambda: _waits_for(client, cancelled, "resource"))
    resp = await client.post(f"/v1/processes/{cancelled}/cancel")
    assert resp.status == 202
    ended = await reaches(client, cancelled, "cancelled")
    assert [a["step"] for a in ended["history"]] == []  # it never ran its step
    assert await gauges(client) == ({"lanes": 1}, {"lanes": 0})
    after = await started(client, "Parked", {})
    await until(lambda: _waits_for(client, after, "resource"))
    assert (await described(client, after))["waiting_for"]["detail"] == "lanes: 0 ahead"
    await client.post(f"/v1/processes/{holder}/signals/go", json={})
    await until(lambda: _waits_for(client, after, "signal"))  # not stuck behind the cancelled


async def test_a_step_run_again_does_not_reserve_twice(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    flaky = contended(1)
    work = flaky["workflows"][0]["steps"][0]
    work["call"]["path"] = "/flaky"
    work["retry"] = {"max_attempts": 3, "backoff": "10ms", "max_backoff": "10ms"}
    fails = {"left": 2}

    async def flaky_call(request: web.Request) -> web.Response:
        if fails["left"]:
            fails["left"] -= 1
            return web.json_response({}, status=503)
        return web.json_response({"ok": True})

    server = TestServer(web.Application(), host="127.0.0.1")
    server.app.router.add_post("/flaky", flaky_call)
    await server.start_server()
    try:
        services = [
            {"name": "lanes", "instances": [{"id": "l1", "url": str(server.make_url("/"))}]}
        ]
        client = await start_daemon(make_config(services=services, **flaky))
        process_id = await started(client, "Contended", {"n": 1})
        done = await reaches(client, process_id, "completed", "failed")
    finally:
        await server.close()
    assert done["status"] == "completed"  # capacity 1: a second hold would wait for ever
    assert [a["outcome"] for a in done["history"]] == ["error", "error", "ok"]


async def test_a_process_that_fails_releases_its_units(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = contended(1)
    config["workflows"][0]["steps"][0]["call"]["service"] = "nowhere"
    client = await start_daemon(make_config(**config))
    failed = await started(client, "Contended", {"n": 1})
    assert (await reaches(client, failed, "failed"))["status"] == "failed"
    after = await started(client, "Parked", {})
    await until(lambda: _waits_for(client, after, "signal"))


async def test_a_process_whose_last_checkpoint_fails_in_the_engine_releases_its_units(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    config = contended(1)
    config["workflows"][0]["steps"][0]["call"]["service"] = "nowhere"
    client = await start_daemon(make_config(**config))
    store = client.app[PARTS].engine.store
    real = store.checkpoint

    async def checkpoint(process: Process) -> None:
        if process.workflow == "Contended" and process.finished_at is not None:
            raise RuntimeError("simulated: a bug meets the last checkpoint")
        await real(process)

    store.checkpoint = checkpoint  # type: ignore[method-assign]
    await started(client, "Contended", {"n": 1})  # fails; its end is never written
    after = await started(client, "Parked", {})
    await until(lambda: _waits_for(client, after, "signal"))  # it holds the unit


async def test_a_key_without_a_value_fails_the_step(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(1, key="{input.parent}")))
    failed = await reaches(client, await started(client, "Parked", {}), "failed")
    assert failed["error"]["step"] == "park"
    assert failed["error"]["message"].startswith("acquire key:")


async def test_kill_9_while_two_hold_and_eight_wait(
    tmp_path: Path, lanes: tuple[Lanes, str]
) -> None:
    service, url = lanes
    sections = {
        "services": [{"name": "lanes", "instances": [{"id": "l1", "url": url}]}],
        **contended(2),
    }
    with running_daemon(tmp_path, **sections) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            ids = await _start_all(http, "Contended", 10)
            await until(lambda: _gauges_are(http, 2, 8))
            assert len(+service.inside) == 2
        daemon.kill()  # no release, no shutdown code: the table is all that is left

        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            await until(lambda: _gauges_are(http, 2, 8))  # the same two hold, eight wait
            service.gate.set()
            await until(lambda: _gauges_are(http, 0, 0), timeout=20)
            statuses = []
            for process_id in ids:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    statuses.append((await resp.json())["status"])
    assert statuses == ["completed"] * 10
    assert service.most == 2  # never more than two processes inside their step
    assert sorted(service.order) == list(range(10))


async def _start_all(http: aiohttp.ClientSession, workflow: str, count: int) -> list[str]:
    """Start `count` processes one after the other (input n = 0, 1, ...); their ids."""
    ids = []
    for n in range(count):
        async with http.post(f"/v1/workflows/{workflow}", json={"input": {"n": n}}) as resp:
            assert resp.status == 202
            ids.append(str((await resp.json())["id"]))
    return ids


async def _gauges_are(http: aiohttp.ClientSession, in_use: int, waiting: int) -> bool:
    async with http.get("/metrics") as resp:
        text = await resp.text()
    return (
        f'hms_resource_in_use{{resource="lanes"}} {float(in_use)}' in text
        and f'hms_resource_waiting{{resource="lanes"}} {float(waiting)}' in text
    )


def test_acquire_errors_name_the_key_and_line() -> None:
    text = """\
resources:
  - {name: lanes, capacity: 2}
  - {name: lanes, capacity: 0}
workflows:
  - name: W
    steps:
      - name: a
        acquire: {resource: nowhere}
        publish: x
      - name: b
        acquire: {resource: lanes, units: 3}
        publish: x
      - name: c
        acquire: {resource: lanes, units: 0, key: "{steps.d.id}"}
        publish: x
      - name: d
        publish: x
"""
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    assert error.value.errors == [
        "config.yaml:3: resources[1]: duplicate name 'lanes'",
        "config.yaml:3: resources[1].capacity: Input should be greater than or equal to 1",
        "config.yaml:8: workflows[0].steps[0].acquire.resource: no resource named 'nowhere' "
        "(resources: lanes)",
        "config.yaml:11: workflows[0].steps[1].acquire.units: 3 units exceed the capacity of "
        "'lanes' (2)",
        "config.yaml:14: workflows[0].steps[2].acquire.key: {steps.d.id} refers to step 'd', "
        "which does not run before",
        "config.yaml:14: workflows[0].steps[2].acquire.resource: 'lanes' is acquired at step "
        "'b' already: acquire it once, at the first step that needs it, with all the units",
        "config.yaml:14: workflows[0].steps[2].acquire.units: Input should be greater than or "
        "equal to 1",
    ]


async def test_put_checks_acquire_against_the_running_config(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(2)))

    async def define(acquire: dict[str, Any]) -> tuple[int, list[dict[str, str]]]:
        step = {"name": "s", "acquire": acquire, "publish": "x"}
        resp = await client.put("/v1/workflows/Api", json={"steps": [step]})
        body = await resp.json()
        return resp.status, body.get("error", {}).get("details", [])

    status, details = await define({"resource": "nowhere"})
    assert status == 422
    assert [d["path"] for d in details] == ["steps.0.acquire.resource"]
    status, details = await define({"resource": "lanes", "units": 3})
    assert status == 422
    assert details == [
        {"path": "steps.0.acquire.units", "message": "3 units exceed the capacity of 'lanes' (2)"}
    ]
    status, details = await define({"resource": "lanes", "key": "{nope}"})
    assert status == 422 and [d["path"] for d in details] == ["steps.0.acquire.key"]
    assert (await define({"resource": "lanes", "units": 2, "key": "{input.p}"}))[0] == 201


async def test_the_page_shows_each_resource(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(3)))
    await reaches(client, await started(client, "Parked", {}), "waiting")
    page = await (await client.get("/")).text()
    assert '<tr data-resource="lanes">' in page
    row = page.split('<tr data-resource="lanes">')[1].split("</tr>")[0]
    assert [cell.split("<")[0] for cell in row.split("<td>")[1:]] == ["3", "1", "0"]


async def test_a_reload_changes_the_capacity_for_new_grants(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    from monitor.keys import PARTS
    from monitor.reload import apply_config

    old = make_config(**contended(1))
    client = await start_daemon(old)
    first = await started(client, "Parked", {})
    second = await started(client, "Parked", {})
    await until(lambda: _waits_for(client, second, "resource"))
    parts = client.app[PARTS]
    await apply_config(parts, old, make_config(**contended(2)))
    await until(lambda: _waits_for(client, second, "signal"))
    assert (await described(client, first))["waiting_for"]["kind"] == "signal"
    assert await gauges(client) == ({"lanes": 2}, {"lanes": 0})


async def test_the_sdk_builder_deploys_a_step_that_acquires(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    from hms_mgmt import DefinitionError, Workflow, acquire, wait_for

    built = Workflow("Sdk").step(
        "park", wait_for(signal="go"), acquire=acquire("lanes", key="{input.p}")
    )
    assert built.definition()["steps"][0]["acquire"] == {
        "resource": "lanes",
        "units": 1,
        "key": "{input.p}",
    }
    as_dict = Workflow("Sdk").step("park", wait_for(signal="go"), acquire={"resource": "lanes"})
    assert as_dict.definition()["steps"][0]["acquire"] == {"resource": "lanes", "units": 1}
    with pytest.raises(DefinitionError):
        acquire("lanes", units=0)
    with pytest.raises(DefinitionError):
        Workflow("Sdk").step("park", wait_for(signal="go"), acquire={"resource": "l", "n": 1})

    client = await start_daemon(make_config(**contended(1)))
    resp = await client.put("/v1/workflows/Sdk", json=built.definition())
    assert resp.status == 201, await resp.text()
    first = await started(client, "Sdk", {"p": "P-7"})
    second = await started(client, "Sdk", {"p": "P-7"})
    await until(lambda: _waits_for(client, first, "signal"))
    await until(lambda: _waits_for(client, second, "resource"))
    assert (await described(client, second))["waiting_for"]["detail"] == "lanes key P-7: 0 ahead"


async def test_kill_9_keeps_a_grant_that_went_out_of_start_order(
    tmp_path: Path, lanes: tuple[Lanes, str]
) -> None:
    """B started after A but was granted first: after a kill -9 the table, not the order the
    processes resume in, says who holds. Resuming A first must not give it B's unit."""
    service, url = lanes
    gated = {
        "name": "Gated",
        "steps": [
            {"name": "ready", "wait_for": {"signal": "go"}},
            {
                "name": "work",
                "acquire": {"resource": "lanes"},
                "call": {"service": "lanes", "path": "/work", "body": {"n": "{input.n}"}},
            },
        ],
    }
    sections = {
        "services": [{"name": "lanes", "instances": [{"id": "l1", "url": url}]}],
        "resources": [{"name": "lanes", "capacity": 1}],
        "workflows": [gated],
    }
    with running_daemon(tmp_path, **sections) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            first, second = await _start_all(http, "Gated", 2)
            async with http.post(f"/v1/processes/{second}/signals/go", json={}) as resp:
                assert resp.status == 202
            await until(lambda: _gauges_are(http, 1, 0))  # the second holds, inside /work
            async with http.post(f"/v1/processes/{first}/signals/go", json={}) as resp:
                assert resp.status == 202
            await until(lambda: _gauges_are(http, 1, 1))
        daemon.kill()

        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            await until(lambda: _gauges_are(http, 1, 1))
            await until(lambda: _called(service, 2))
            await asyncio.sleep(0.3)  # a wrong grant would have sent the first one in by now
            service.gate.set()
            await until(lambda: _gauges_are(http, 0, 0), timeout=20)
    assert service.most == 1
    assert service.calls == [1, 1, 0]  # the holder again (same key), only then the waiter


async def _called(service: Lanes, times: int) -> bool:
    return len(service.calls) >= times


ACQUIRED_TWICE = """\
resources:
  - {name: lanes, capacity: 2}
  - {name: funds, capacity: 1}
workflows:
  - name: Twice
    steps:
      - name: a
        acquire: {resource: lanes}
        publish: x
      - name: b
        acquire: {resource: funds, key: "{input.p}"}
        publish: x
      - name: c
        acquire: {resource: lanes, key: "{input.p}"}
        publish: x
  - name: Branches
    steps:
      - name: both
        acquire: {resource: funds}
        parallel:
          - {name: l, acquire: {resource: lanes}, publish: x}
          - {name: r, acquire: {resource: lanes}, publish: x}
          - {name: f, acquire: {resource: funds}, publish: x}
"""


def test_a_workflow_acquires_each_resource_at_one_step_only() -> None:
    """A second step (or branch) acquiring what an earlier one holds would wait for its own
    units, or hold some while waiting for more: two such processes wait for each other."""
    with pytest.raises(ConfigError) as error:
        parse_config(ACQUIRED_TWICE)
    advice = "already: acquire it once, at the first step that needs it, with all the units"
    assert error.value.errors == [
        f"config.yaml:14: workflows[0].steps[2].acquire.resource: 'lanes' is acquired at step "
        f"'a' {advice}",
        f"config.yaml:22: workflows[1].steps[0].parallel[1].acquire.resource: 'lanes' is "
        f"acquired at step 'l' {advice}",
        f"config.yaml:23: workflows[1].steps[0].parallel[2].acquire.resource: 'funds' is "
        f"acquired at step 'both' {advice}",
    ]


async def test_put_refuses_a_workflow_that_acquires_a_resource_twice(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(**contended(2)))
    lanes = {"resource": "lanes"}
    steps = [
        {"name": "a", "acquire": lanes, "publish": "x"},
        {"name": "b", "parallel": [{"name": "c", "acquire": lanes, "publish": "x"}]},
    ]
    resp = await client.put("/v1/workflows/Api", json={"steps": steps})
    assert resp.status == 422
    assert (await resp.json())["error"]["details"] == [
        {
            "path": "steps.1.parallel.0.acquire.resource",
            "message": "'lanes' is acquired at step 'a' already: acquire it once, at the "
            "first step that needs it, with all the units",
        }
    ]


async def test_a_process_never_waits_for_units_it_holds_itself(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Versions stored before PUT refused them still run: a later step (or a sibling
    branch) of the same (resource, key) shares the request its process has."""
    monkeypatch.setattr("monitor.config._check_acquires", lambda workflow, at, capacities: ())
    client = await start_daemon(make_config(**contended(1)))
    lanes = {"resource": "lanes"}
    twice = [
        {"name": "a", "acquire": lanes, "publish": "x"},
        {"name": "b", "acquire": lanes, "publish": "x"},
    ]
    both = [
        {
            "name": "both",
            "parallel": [
                {"name": "l", "acquire": lanes, "publish": "x"},
                {"name": "r", "acquire": lanes, "publish": "x"},
            ],
        }
    ]
    for name, steps in (("Twice", twice), ("Both", both)):
        assert (await client.put(f"/v1/workflows/{name}", json={"steps": steps})).status == 201
        done = await reaches(client, await started(client, name, {}), "completed", "failed")
        assert done["status"] == "completed", done["waiting_for"]
    holder = await started(client, "Parked", {})  # now both branches queue behind it
    await until(lambda: _waits_for(client, holder, "signal"))
    queued = await started(client, "Both", {})
    await until(lambda: _waits_for(client, queued, "resource"))
    await client.post(f"/v1/processes/{holder}/signals/go", json={})
    assert (await reaches(client, queued, "completed", "failed"))["status"] == "completed"
    assert await gauges(client) == ({"lanes": 0}, {"lanes": 0})


async def test_two_processes_that_take_units_at_two_steps_do_not_wait_for_each_other(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each takes 1 of 2 units, then 1 more at its second step: the second step re-uses
    the first one's unit, where queueing would leave both waiting for ever."""
    monkeypatch.setattr("monitor.config._check_acquires", lambda workflow, at, capacities: ())
    client = await start_daemon(make_config(**contended(2)))
    steps = [
        {"name": "first", "acquire": {"resource": "lanes"}, "wait_for": {"signal": "go"}},
        {"name": "second", "acquire": {"resource": "lanes"}, "publish": "x"},
    ]
    assert (await client.put("/v1/workflows/HoldWait", json={"steps": steps})).status == 201
    ids = [await started(client, "HoldWait", {}) for _ in range(2)]
    for process_id in ids:
        assert (await reaches(client, process_id, "waiting"))["waiting_for"]["kind"] == "signal"
    for process_id in ids:
        await client.post(f"/v1/processes/{process_id}/signals/go", json={})
    for process_id in ids:
        assert (await reaches(client, process_id, "completed", "failed"))["status"] == "completed"


async def test_a_step_asking_for_more_of_its_processs_hold_fails_at_once(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("monitor.config._check_acquires", lambda workflow, at, capacities: ())
    client = await start_daemon(make_config(**contended(2, key="{input.p}")))
    acquire = {"resource": "lanes", "key": "{input.p}"}
    steps = [
        {"name": "first", "acquire": acquire, "publish": "x"},
        {"name": "second", "acquire": {**acquire, "units": 2}, "publish": "x"},
    ]
    assert (await client.put("/v1/workflows/More", json={"steps": steps})).status == 201
    failed = await reaches(client, await started(client, "More", {"p": "P-7"}), "failed")
    assert failed["error"] == {
        **failed["error"],
        "step": "second",
        "message": "step 'second' asks for 2 units of 'lanes' key P-7, which this process "
        "already asked for at step 'first' (1): acquire it once, at the first step that "
        "needs it, with all the units",
    }
    assert await gauges(client) == ({"lanes": 0}, {"lanes": 0})


async def test_kill_9_drops_the_queued_request_of_a_branch_a_sibling_halted(
    tmp_path: Path,
) -> None:
    """Branch b waits for the unit Parked holds; its sibling a fails for good, which halts
    b. The daemon dies before b's leave is written (a trigger keeps the row, as a kill
    between the two writes would): after the restart the freed unit goes to a live waiter,
    not to the halted branch (its process compensates; b never runs)."""
    payment = {
        "name": "Payment",
        "queue": "payments",
        "steps": [
            {"name": "reserve", "task": "reserveFunds", "compensate": {"task": "releaseFunds"}},
            {
                "name": "both",
                "parallel": [
                    {"name": "a", "task": "aTask"},
                    {"name": "b", "acquire": {"resource": "lanes"}, "publish": "b.done"},
                ],
            },
        ],
    }
    use = {"name": "use", "acquire": {"resource": "lanes"}, "publish": "used"}
    later = {"name": "Later", "steps": [use]}
    sections = contended(1)
    sections["workflows"] += [payment, later]
    with running_daemon(tmp_path, **sections) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            [parked] = await _start_all(http, "Parked", 1)
            await until(lambda: _gauges_are(http, 1, 0))
            [paying] = await _start_all(http, "Payment", 1)
            await _answer(http, "reserveFunds", "complete", {"output": {}})
            with sqlite3.connect(tmp_path / "hms.db") as db:  # b's row outlives its leave
                db.execute(
                    "CREATE TRIGGER kept BEFORE DELETE ON resource_holds WHEN old.step = 'b' "
                    "BEGIN SELECT RAISE(IGNORE); END"
                )
            await until(lambda: _gauges_are(http, 1, 1))  # b waits behind Parked
            await _answer(http, "aTask", "fail", {"error": "no", "retryable": False})
            await until(lambda: _gauges_are(http, 1, 0))  # b left the queue, in memory
            await until(lambda: _status_is(http, paying, "compensating"))
        daemon.kill()
        with sqlite3.connect(tmp_path / "hms.db") as db:
            db.execute("DROP TRIGGER kept")

        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            [after] = await _start_all(http, "Later", 1)
            await until(lambda: _gauges_are(http, 1, 1))
            async with http.post(f"/v1/processes/{parked}/signals/go", json={}) as resp:
                assert resp.status == 202
            await until(lambda: _status_is(http, after, "completed"))
            await until(lambda: _gauges_are(http, 0, 0))
            assert await _status_is(http, paying, "compensating")  # releaseFunds is open


async def _answer(http: aiohttp.ClientSession, task: str, verb: str, body: dict[str, Any]) -> None:
    """Take the next task of `payments`, which must be `task`, and complete or fail it."""
    poll = {"queue": "payments", "wait": "5s", "worker": "w-test", "max": 1}
    async with http.post("/v1/tasks/poll", json=poll) as resp:
        [got] = (await resp.json())["tasks"]
    assert got["task"] == task
    async with http.post(f"/v1/tasks/{got['id']}/{verb}", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def _status_is(http: aiohttp.ClientSession, process_id: str, status: str) -> bool:
    async with http.get(f"/v1/processes/{process_id}") as resp:
        return bool((await resp.json())["status"] == status)


async def test_a_step_and_a_branch_queued_for_a_resource_say_so_in_their_reason(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    """The process row says only that a strand waits; the pool says for what. Each step
    and branch in a queue shows it, not the delay or task its row would suggest."""
    sections = contended(1, key="{input.parent}")
    acquire = {"resource": "lanes", "key": "{input.parent}"}
    take = {"name": "take", "acquire": acquire, "publish": "taken"}
    both = {
        "name": "Both",
        "steps": [
            {
                "name": "both",
                "parallel": [take, {"name": "park", "wait_for": {"signal": "go"}}],
            }
        ],
    }
    sections["workflows"].append(both)
    client = await start_daemon(make_config(**sections))
    holder = await started(client, "Parked", {"parent": "P-7"})
    await until(lambda: _waits_for(client, holder, "signal"))
    step = await started(client, "Parked", {"parent": "P-7"})
    await until(lambda: _waits_for(client, step, "resource"))
    branch = await started(client, "Both", {"parent": "P-7"})
    await until(lambda: _waits_for(client, branch, "resource"))

    queued = (await described(client, step))["steps"]
    assert queued == [{"name": "park", "state": "waiting", "reason": "lanes key P-7: 0 ahead"}]
    [entry] = (await described(client, branch))["steps"]
    assert entry["branches"] == [
        {"name": "take", "state": "waiting", "reason": "lanes key P-7: 1 ahead"},
        {"name": "park", "state": "waiting", "reason": "signal go"},
    ]
    html = await (await client.get(f"/processes/{branch}")).text()
    assert '<span class="reason">lanes key P-7: 1 ahead</span>' in html
