"""Parallel steps: branches run together against real HTTP services, a real worker process,
signals, cancels, and a daemon killed mid-step (DESIGN.md §2 `parallel`)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from monitor.config import Config, ConfigError, parse_config
from monitor.keys import PARTS
from registry import StoreUnavailable

from .conftest import AppClient, until
from .processes import running_daemon
from .test_status_page import browser  # noqa: F401 (the fixture: a real headless Chromium)
from .test_tasks import worker
from .test_workflows import register


@dataclass
class Units:
    """Dispatch services: each call is recorded (path, Idempotency-Key); `together` calls
    must all have arrived before any answers (504 after 5s otherwise): proof they ran at
    the same time. `fail[path]` answers that status; `hold[path]` waits for its event."""

    together: int = 0
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append((request.path, request.headers.get("Idempotency-Key")))
            if self.together and len(self.seen) >= self.together:
                self.arrived.set()
            if self.together:
                try:
                    await asyncio.wait_for(self.arrived.wait(), 5)
                except TimeoutError:
                    return web.json_response({"error": "alone"}, status=504)
            if request.path in self.hold:
                await self.hold[request.path].wait()
            if request.path in self.fail:
                return web.json_response({"error": "no unit"}, status=self.fail[request.path])
            return web.json_response({"unit": request.path.strip("/").replace("/", "-")})

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app


def branch(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "call": {"service": "units", "path": f"/{name}"}, **extra}


def undone(name: str) -> dict[str, Any]:
    return branch(name, compensate={"service": "units", "path": f"/{name}/cancel"})


DISPATCH = {
    "name": "Dispatch",
    "steps": [
        {"name": "dispatch", "parallel": [branch("fire"), branch("ems"), branch("police")]},
        {"name": "report", "call": {"service": "units", "path": "/report"}},
    ],
    "output": {"fire": "{steps.fire.unit}", "all": "{steps.dispatch}"},
}
SAGA = {
    "name": "Saga",
    "steps": [
        undone("reserve"),
        {"name": "both", "parallel": [undone("fire"), undone("ems")]},
        {"name": "report", "call": {"service": "units", "path": "/report"}},
    ],
}
SIGNALLED = {
    "name": "Signalled",
    "steps": [
        undone("reserve"),
        {
            "name": "both",
            "parallel": [
                {"name": "docs", "wait_for": {"signal": "docsValidated", "timeout": "30s"}},
                undone("notify"),
            ],
        },
    ],
}


@pytest.fixture
def units() -> Units:
    return Units()


@pytest.fixture
async def service(units: Units) -> AsyncIterator[TestServer]:
    server = TestServer(units.app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def client(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> AppClient:
    client = await start_daemon(make_config(workflows=[DISPATCH, SAGA, SIGNALLED]))
    await register(client, "units", "i1", str(service.make_url("/")))
    return client


async def run(client: AppClient, name: str, wait: str = "10s") -> dict[str, Any]:
    resp = await client.post(f"/v1/workflows/{name}", params={"wait": wait}, json={"input": {}})
    assert resp.status in (200, 202), await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def process(client: AppClient, process_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def reaches(
    client: AppClient, process_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.clear()
        seen.update(await process(client, process_id))
        return done(seen)

    await until(reached)
    return seen


def branches(view: dict[str, Any], step: str) -> dict[str, str]:
    entry = next(s for s in view["steps"] if s["name"] == step)
    return {b["name"]: b["state"] for b in entry["branches"]}


async def test_three_calls_run_together_and_each_branch_s_output_is_its_own(
    client: AppClient, units: Units
) -> None:
    units.together = 3  # no branch's call is answered before all three came: 504 else
    done = await run(client, "Dispatch")
    assert done["status"] == "completed", done
    assert sorted(units.paths()[:3]) == ["/ems", "/fire", "/police"]
    assert done["outputs"]["fire"] == {"unit": "fire"}
    assert done["outputs"]["dispatch"] == {
        "fire": {"unit": "fire"},
        "ems": {"unit": "ems"},
        "police": {"unit": "police"},
    }
    assert done["output"]["fire"] == "fire"
    assert branches(done, "dispatch") == {
        "fire": "completed",
        "ems": "completed",
        "police": "completed",
    }
    assert dict(units.seen)["/ems"] == f"{done['id']}/ems"  # keyed <process>/<branch>
    assert [a["step"] for a in done["history"]][-1] == "report"


async def test_a_failing_branch_stops_the_step_and_finished_work_is_undone_once(
    client: AppClient, units: Units
) -> None:
    units.fail["/ems"] = 400
    units.hold["/ems"] = asyncio.Event()
    started = await run(client, "Saga", wait="0s")
    await reaches(client, started["id"], lambda p: branches(p, "both")["fire"] == "completed")
    units.hold["/ems"].set()  # ems fails for good after fire has finished
    done = await reaches(client, started["id"], lambda p: p["status"] == "compensated")
    assert done["error"]["step"] == "ems" and done["error"]["status"] == 400
    assert units.paths() == ["/reserve", "/fire", "/ems", "/fire/cancel", "/reserve/cancel"]
    assert dict(units.seen)["/fire/cancel"] == f"{done['id']}/fire.compensate"
    assert branches(done, "both") == {"fire": "compensated", "ems": "failed"}
    assert "/report" not in units.paths()


async def test_a_branch_waits_for_a_signal_while_another_calls(
    client: AppClient, units: Units
) -> None:
    started = await run(client, "Signalled", wait="0s")
    waiting = await reaches(
        client, started["id"], lambda p: p["status"] == "waiting" and "/notify" in units.paths()
    )
    assert waiting["waiting_for"]["kind"] == "signal"
    assert waiting["waiting_for"]["detail"] == "signal docsValidated"
    both = next(s for s in waiting["steps"] if s["name"] == "both")
    assert both["branches"] == [
        {"name": "docs", "state": "waiting", "reason": "signal docsValidated"},
        {"name": "notify", "state": "completed"},
    ]
    resp = await client.post(
        f"/v1/processes/{started['id']}/signals/docsValidated", json={"by": "clerk"}
    )
    assert resp.status == 202
    done = await reaches(client, started["id"], lambda p: p["status"] == "completed")
    assert done["outputs"]["docs"] == {"by": "clerk"}
    assert done["outputs"]["both"] == {"docs": {"by": "clerk"}, "notify": {"unit": "notify"}}


async def test_the_process_waits_only_when_every_running_branch_waits(
    client: AppClient, units: Units
) -> None:
    units.hold["/notify"] = asyncio.Event()
    started = await run(client, "Signalled", wait="0s")
    busy = await reaches(
        client,
        started["id"],
        lambda p: "/notify" in units.paths() and branches(p, "both")["docs"] == "waiting",
    )
    assert busy["status"] == "running" and busy["waiting_for"] is None  # notify is calling
    assert branches(busy, "both") == {"docs": "waiting", "notify": "running"}
    units.hold["/notify"].set()
    waiting = await reaches(client, started["id"], lambda p: p["status"] == "waiting")
    assert waiting["waiting_for"]["detail"] == "signal docsValidated"


async def test_the_page_shows_branches_side_by_side_with_what_they_wait_for(
    client: AppClient,
    units: Units,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    started = await run(client, "Signalled", wait="0s")
    await reaches(
        client, started["id"], lambda p: p["status"] == "waiting" and "/notify" in units.paths()
    )
    html = await (await client.get(f"/processes/{started['id']}")).text()
    assert (
        '<li class="branch outcome-waiting" data-branch="docs"><strong>docs</strong> '
        '<span class="status status-waiting">waiting</span><br>'
        '<span class="reason">signal docsValidated</span></li>'
    ) in html
    assert (
        'data-branch="notify"><strong>notify</strong> <span class="status status-completed">'
        in html
    )
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    await page.goto(str(client.make_url(f"/processes/{started['id']}")))
    docs = await page.locator('[data-branch="docs"]').bounding_box()
    notify = await page.locator('[data-branch="notify"]').bounding_box()
    assert docs is not None and notify is not None
    assert docs["y"] == notify["y"] and notify["x"] >= docs["x"] + docs["width"]  # one row
    assert problems == []


async def test_a_skipped_branch_shows_why_and_the_step_completes(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    units: Units,
) -> None:
    workflow = {
        "name": "Maybe",
        "steps": [
            {
                "name": "both",
                "parallel": [branch("fire"), branch("ems", when="[input.injured] == true")],
            },
            {"name": "report", "call": {"service": "units", "path": "/report"}},
        ],
    }
    client = await start_daemon(make_config(workflows=[workflow]))
    await register(client, "units", "i1", str(service.make_url("/")))
    resp = await client.post("/v1/workflows/Maybe?wait=10s", json={"input": {"injured": False}})
    done = await resp.json()
    assert done["status"] == "completed"
    assert units.paths() == ["/fire", "/report"]
    both = next(s for s in done["steps"] if s["name"] == "both")
    assert both["branches"] == [
        {"name": "fire", "state": "completed"},
        {"name": "ems", "state": "skipped", "reason": "[input.injured] == true (got false)"},
    ]
    assert done["outputs"]["both"] == {"fire": {"unit": "fire"}}
    html = await (await client.get(f"/processes/{done['id']}")).text()
    assert '<span class="reason">[input.injured] == true (got false)</span>' in html


async def test_a_synchronous_start_answers_once_its_respond_after_branch_is_skipped(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> None:
    workflow = {
        "name": "Triage",
        "respond_after": "ems",
        "steps": [
            {
                "name": "both",
                "parallel": [
                    branch("ems", when="[input.injured] == true"),
                    {"name": "docs", "wait_for": {"signal": "docsValidated"}},
                ],
            },
        ],
    }
    client = await start_daemon(make_config(workflows=[workflow]))
    await register(client, "units", "i1", str(service.make_url("/")))
    resp = await client.post("/v1/workflows/Triage?wait=20s", json={"input": {"injured": False}})
    answer = await resp.json()
    assert resp.status == 200  # at the skip, not after 20 s with the docs still awaited
    assert answer["status"] == "waiting"


async def test_a_cancel_mid_parallel_ends_the_wait_and_undoes_finished_branches(
    client: AppClient, units: Units
) -> None:
    started = await run(client, "Signalled", wait="0s")
    await reaches(
        client, started["id"], lambda p: p["status"] == "waiting" and "/notify" in units.paths()
    )
    resp = await client.post(f"/v1/processes/{started['id']}/cancel")
    assert resp.status == 202
    done = await reaches(client, started["id"], lambda p: p["status"] == "cancelled")
    assert units.paths() == ["/reserve", "/notify", "/notify/cancel", "/reserve/cancel"]
    assert branches(done, "both")["notify"] == "compensated"


async def test_a_task_branch_is_served_by_a_worker_process(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    units: Units,
    tmp_path: Path,
) -> None:
    workflow = {
        "name": "Mixed",
        "queue": "dispatch",
        "steps": [
            {"name": "both", "parallel": [branch("fire"), {"name": "ems", "task": "sendEms"}]},
        ],
    }
    client = await start_daemon(make_config(workflows=[workflow]))
    await register(client, "units", "i1", str(service.make_url("/")))
    url = str(client.make_url("/"))
    with worker(url, "w1", "complete", tmp_path / "w.log", queue="dispatch"):
        started = await run(client, "Mixed", wait="0s")
        done = await reaches(client, started["id"], lambda p: p["status"] == "completed")
    assert done["outputs"]["ems"] == {"by": "w1", "task": "sendEms", "key": f"{done['id']}/ems"}
    assert done["outputs"]["fire"] == {"unit": "fire"}


async def test_a_daemon_killed_mid_parallel_does_not_run_a_finished_branch_again(
    tmp_path: Path, units: Units, service: TestServer
) -> None:
    units.hold["/ems"] = asyncio.Event()
    sections = {
        "services": [
            {"name": "units", "instances": [{"id": "i1", "url": str(service.make_url("/"))}]}
        ],
        "workflows": [SAGA],
    }
    with running_daemon(tmp_path, **sections) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            async with http.post("/v1/workflows/Saga", json={"input": {}}) as resp:
                process_id = (await resp.json())["id"]

            async def fire_done() -> bool:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    view = await resp.json()
                return branches(view, "both").get("fire") == "completed" and "/ems" in units.paths()

            await until(fire_done)
        daemon.kill()  # ems's call is in flight, fire's outcome is checkpointed
        units.hold["/ems"].set()
        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:

            async def completed() -> bool:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    return (await resp.json())["status"] == "completed"

            await until(completed, timeout=20)
    assert units.paths().count("/fire") == 1  # finished before the kill: not called again
    assert [key for path, key in units.seen if path == "/ems"] == [f"{process_id}/ems"] * 2
    assert units.paths().count("/report") == 1


BAD = """
workflows:
  - name: W
    steps:
      - name: a
        publish: a.done
      - name: both
        parallel:
          - name: a
            publish: x
          - name: b
            when: "[steps.c.x] == 1"
            publish: y
          - name: c
            parallel:
              - {name: d, publish: z}
"""


def test_colliding_branch_names_and_nested_parallel_are_config_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BAD)
    errors = caught.value.errors
    assert any("workflows[0].steps[1].parallel[0]: duplicate name 'a'" in e for e in errors), errors
    assert any(":12: workflows[0].steps[1].parallel[1].when:" in e for e in errors), errors
    assert any("not itself parallel" in e for e in errors), errors


async def test_a_bad_parallel_step_is_refused_by_the_api(client: AppClient) -> None:
    spec = {
        "steps": [
            {"name": "a", "publish": "a.done"},
            {"name": "both", "parallel": [{"name": "a", "publish": "x"}]},
        ]
    }
    resp = await client.put("/v1/workflows/Bad", json=spec)
    assert resp.status == 422
    details = (await resp.json())["error"]["details"]
    assert {"path": "steps.1.parallel.0", "message": "duplicate name 'a'"} in details


async def test_a_branch_killed_in_its_retry_backoff_resumes_with_its_attempt_count(
    tmp_path: Path, units: Units, service: TestServer
) -> None:
    retry = {"max_attempts": 3, "backoff": "1500ms", "max_backoff": "2s"}
    flaky = {
        "name": "Flaky",
        "steps": [{"name": "both", "parallel": [branch("fire"), branch("ems", retry=retry)]}],
    }
    units.fail["/ems"] = 503
    url = str(service.make_url("/"))
    sections = {
        "services": [{"name": "units", "instances": [{"id": "i1", "url": url}]}],
        "workflows": [flaky],
    }
    with running_daemon(tmp_path, **sections) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            async with http.post("/v1/workflows/Flaky", json={"input": {}}) as resp:
                process_id = (await resp.json())["id"]

            async def backing_off() -> bool:  # as stored: a read shows rows still in flight
                with sqlite3.connect(tmp_path / "hms.db") as db:
                    row = db.execute(
                        "SELECT status, branches FROM processes WHERE id = ?", [process_id]
                    ).fetchone()
                return row is not None and row[0] == "waiting" and '"attempt":1' in (row[1] or "")

            await until(backing_off)
        daemon.kill()  # ems failed once and waits out its backoff; fire is done
        del units.fail["/ems"]
        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            view: dict[str, Any] = {}

            async def completed() -> bool:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    view.update(await resp.json())
                return bool(view["status"] == "completed")

            await until(completed, timeout=20)
    ems = [(a["attempt"], a["outcome"]) for a in view["history"] if a["step"] == "ems"]
    assert ems == [(1, "error"), (2, "ok")]  # the count went on across the restart
    assert units.paths().count("/fire") == 1


class FirstCheckpointFailsLate:
    """The store's database, whose first checkpoint write fails after 50ms in flight (a
    disk that fills under it): meanwhile the other branch makes its checkpoint."""

    def __init__(self, client: AppClient) -> None:
        store = client.app[PARTS].engine.store
        self._db, store._db, self.armed = store._db, self, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def write(self, fn: Callable[[Any], Any]) -> Any:
        if self.armed and "checkpoint" in fn.__qualname__:
            self.armed = False
            await asyncio.sleep(0.05)
            raise StoreUnavailable("disk full (test)")
        return await self._db.write(fn)


async def test_a_branch_checkpoint_refused_while_another_commits_loses_no_history_line(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    two = {
        "name": "Two",
        "steps": [
            {
                "name": "both",
                "parallel": [
                    {"name": "a", "publish": "a.done"},
                    {"name": "b", "publish": "b.done"},
                ],
            },
            {"name": "after", "publish": "both.done"},
        ],
    }
    client = await start_daemon(make_config(workflows=[two]))
    FirstCheckpointFailsLate(client)
    started = await run(client, "Two", wait="0s")
    done = await reaches(client, started["id"], lambda p: p["status"] == "completed")
    steps = [a["step"] for a in done["history"]]
    assert sorted(steps[:2]) == ["a", "b"] and steps[2:] == ["after"]
