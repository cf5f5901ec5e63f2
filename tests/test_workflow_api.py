"""Results, errors, early answers, signals and definitions over the API, on a real daemon
calling a real HTTP service, across restarts of the app on the same SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.convert import definitions_from_config
from monitor.keys import DATABASE, ENGINE
from monitor.storage.database import APPLICATION_ID
from workflows.records import Signal

from .conftest import BOTH_STORES, AppClient, FakeClock, until
from .services import Calls
from .test_workflows import events_of, process, register, until_status

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

Start = Callable[..., Awaitable[AppClient]]

GRANT = {
    "name": "Grant",
    "output": {"payment": "{steps.pay.payment_id}", "amount": "{input.amount}"},
    "respond_after": "pay",
    "steps": [
        {"name": "validate", "call": {"service": "ach", "path": "/validate"}},
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.amount}"}},
        },
        {"name": "follow_up", "delay": "1h", "call": {"service": "ach", "path": "/follow"}},
    ],
}
PLAIN = {
    "name": "Plain",
    "steps": [
        {"name": "validate", "call": {"service": "ach", "path": "/validate"}},
        {"name": "pay", "call": {"service": "ach", "path": "/transfers", "body": {"amount": 1}}},
    ],
}


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(workflows=[GRANT, PLAIN])


@pytest.fixture
def up(start_daemon: Start, service: TestServer) -> Start:
    """Start (or restart) the daemon on `config`, with the service registered."""

    async def start(config: Config) -> AppClient:
        client = await start_daemon(config)
        await register(client, "ach", "i1", str(service.make_url("/")))
        return client

    return start


async def start(client: AppClient, name: str, input_: Any, wait: str = "10s") -> Any:
    resp = await client.post(f"/v1/workflows/{name}", params={"wait": wait}, json={"input": input_})
    assert resp.status in (200, 202), await resp.text()
    return await resp.json()


# -- results and errors ---------------------------------------------------------------


async def test_a_completed_process_has_every_step_output_by_default(
    up: Start, config: Config
) -> None:
    client = await up(config)
    done = await start(client, "Plain", {})
    assert done["status"] == "completed"
    assert done["output"] == {"validate": {"valid": True}, "pay": done["outputs"]["pay"]}
    assert done["error"] is None


async def test_the_output_template_is_the_result_and_survives_a_restart(
    up: Start, config: Config
) -> None:
    client = await up(config)
    answered = await start(client, "Grant", {"amount": 12.5})
    process_id = answered["id"]
    await client.close()

    client = await up(config)
    running = await process(client, process_id)
    assert running["status"] == "waiting"  # the follow-up is an hour away
    assert running["output"] == {"payment": running["outputs"]["pay"]["payment_id"], "amount": 12.5}


async def test_a_failed_step_gives_its_status_and_the_start_of_the_body(
    up: Start, config: Config, calls: Calls
) -> None:
    calls.fail["/transfers"] = [422]
    client = await up(config)
    failed_events = events_of(client, "workflow.failed")
    done = await start(client, "Plain", {})
    assert done["status"] == "failed"
    error = {"step": "pay", "message": "HTTP 422", "status": 422}
    assert done["error"] == {**error, "body": '{"error": "planned failure"}'}
    assert done["output"] is None
    await until(lambda: _nonempty(failed_events))
    data = failed_events[0].data
    assert data["error"] == "step pay: HTTP 422"  # the line notifications show
    assert data["failure"] == done["error"]
    listed = await (await client.get("/v1/processes", params={"workflow": "Plain"})).json()
    assert listed["processes"][0]["error"] == done["error"]
    page = await (await client.get(f"/processes/{done['id']}")).text()
    assert "step pay: HTTP 422 (HTTP 422)" in page and "planned failure" in page
    assert "<dt>Definition</dt><dd>version 1</dd>" in page


async def test_an_error_body_is_cut_to_a_kibibyte(
    up: Start, config: Config, calls: Calls, service: TestServer
) -> None:
    client = await up(config)
    calls.fail["/validate"] = [400]
    calls.fail_body["/validate"] = "x" + "é" * 2000  # the cut falls inside a character
    done = await start(client, "Plain", {})
    assert done["error"]["status"] == 400
    assert done["error"]["body"] == "x" + "é" * 511 + "\ufffd"


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_rows_written_before_errors_had_a_shape_still_load(up: Start, config: Config) -> None:
    path = Path(config.storage.path)
    with sqlite3.connect(path) as db:  # the processes table as the first release wrote it
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(OLD_PROCESSES)
        db.execute(
            "INSERT INTO processes (id, workflow, status, input, outputs, created_at, "
            "updated_at, finished_at, error) VALUES "
            "('p-old', 'Plain', 'failed', '{}', '{}', 1.0, 2.0, 2.0, 'step pay: HTTP 503')"
        )
    client = await up(config)
    old = await process(client, "p-old")
    assert old["error"] == {
        "step": None,
        "message": "step pay: HTTP 503",
        "status": None,
        "body": None,
    }
    assert old["workflow_version"] == 1
    assert (await start(client, "Plain", {}))["status"] == "completed"  # new columns added


# -- respond_after ---------------------------------------------------------------------


async def test_a_synchronous_start_answers_after_the_respond_after_step(
    up: Start, config: Config, calls: Calls
) -> None:
    client = await up(config)
    resp = await client.post(
        "/v1/workflows/Grant", params={"wait": "30s"}, json={"input": {"amount": 3}}
    )
    assert resp.status == 200
    answered = await resp.json()
    assert answered["status"] in ("running", "waiting")  # the process goes on
    payment = answered["outputs"]["pay"]["payment_id"]
    assert answered["output"] == {"payment": payment, "amount": 3}
    assert "/follow" not in calls.paths()
    assert (await process(client, answered["id"]))["current_step"] == "follow_up"


async def test_a_process_resumed_past_its_respond_after_step_answers_at_once(
    up: Start, config: Config
) -> None:
    client = await up(config)
    first = await start(client, "Grant", {"amount": 1}, wait="0s")
    await until_status(client, first["id"], "waiting")
    await client.close()

    client = await up(config)
    resp = await client.post(
        "/v1/workflows/Grant",
        params={"wait": "30s"},
        json={"input": {"amount": 1}, "idempotency_key": "k"},
    )
    assert resp.status == 200
    again = await client.post(
        "/v1/workflows/Grant",
        params={"wait": "30s"},
        json={"input": {"amount": 1}, "idempotency_key": "k"},
    )
    assert again.status == 200 and (await again.json())["id"] == (await resp.json())["id"]


async def test_respond_after_must_name_a_step(make_config: Callable[..., Config]) -> None:
    from monitor.config import ConfigError

    with pytest.raises(ConfigError) as error:
        make_config(workflows=[{**GRANT, "respond_after": "payy"}])
    assert any(
        "workflows[0].respond_after: no step named 'payy'" in line for line in error.value.errors
    )


async def _nonempty(items: list[Any]) -> bool:
    return bool(items)


OLD_PROCESSES = """
CREATE TABLE processes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    outputs TEXT NOT NULL,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    deadline_at REAL,
    deadline_missed INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    wake_at REAL,
    wait_seq INTEGER,
    compensating_from INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    UNIQUE (workflow, idempotency_key)
)
"""


# -- {process.id} and publish data ------------------------------------------------------

NOTIFY = {
    "name": "Notify",
    "steps": [
        {
            "name": "register",
            "call": {
                "service": "ach",
                "path": "/{process.id}",
                "body": {"reply_to": "{process.id}", "who": "{input.who}"},
            },
        },
        {
            "name": "notify",
            "publish": "grant.paid",
            "data": {"application": "{input.who}", "process": "{process.id}"},
        },
    ],
}


async def test_a_step_sends_its_process_id_and_a_publish_step_its_data(
    up: Start, make_config: Callable[..., Config], calls: Calls
) -> None:
    client = await up(make_config(workflows=[NOTIFY]))
    paid = events_of(client, "grant.paid")
    done = await start(client, "Notify", {"who": "A-7"})
    assert done["status"] == "completed"
    [(_, path, body, _)] = calls.seen
    assert (path, body) == (f"/{done['id']}", {"reply_to": done["id"], "who": "A-7"})
    await until(lambda: _nonempty(paid))
    assert paid[0].data == {"application": "A-7", "process": done["id"]}


async def test_data_templates_are_checked_at_load(make_config: Callable[..., Config]) -> None:
    from monitor.config import ConfigError

    steps = [dict(NOTIFY["steps"][0]), {**NOTIFY["steps"][1], "data": {"x": "{process.name}"}}]
    with pytest.raises(ConfigError) as error:
        make_config(workflows=[{**NOTIFY, "steps": steps}])
    assert any(
        "workflows[0].steps[1].data: {process.name} must start" in e for e in error.value.errors
    )


# -- signals ----------------------------------------------------------------------------

PERMIT = {
    "name": "Permit",
    "steps": [
        {"name": "submit", "call": {"service": "ach", "path": "/submit"}},
        {"name": "docs", "wait_for": {"signal": "docsValidated", "timeout": "1h"}},
        {"name": "approve", "call": {"service": "ach", "path": "/approve", "body": "{steps.docs}"}},
        {"name": "again", "wait_for": {"signal": "docsValidated"}},
    ],
}
EARLY = {
    "name": "Early",
    "steps": [
        {"name": "submit", "delay": "300ms", "call": {"service": "ach", "path": "/submit"}},
        {"name": "docs", "wait_for": {"signal": "docsValidated"}},
        {"name": "again", "wait_for": {"signal": "docsValidated", "timeout": "300ms"}},
    ],
}
KEEP = {
    "name": "Keep",
    "steps": [
        {"name": "submit", "delay": "10m", "call": {"service": "ach", "path": "/submit"}},
        {"name": "docs", "wait_for": {"signal": "docsValidated"}},
    ],
}
AUTH = {
    "auth": {
        "tokens": [
            {"name": "admin-token", "token": "admin-token", "scopes": ["*"]},
            {
                "name": "permit-token",
                "token": "permit-token",
                "scopes": ["signal:Permit", "start:*"],
            },
            {
                "name": "other-token",
                "token": "other-token",
                "scopes": ["signal:Grant", "cancel:Grant"],
            },
        ]
    }
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signal(client: AppClient, process_id: str, data: Any = None, **kw: Any) -> Any:
    resp = await client.post(f"/v1/processes/{process_id}/signals/docsValidated", json=data, **kw)
    return resp


async def test_a_signal_is_the_output_of_the_step_waiting_for_it(
    up: Start, make_config: Callable[..., Config], calls: Calls
) -> None:
    client = await up(make_config(workflows=[PERMIT]))
    started = await start(client, "Permit", {}, wait="0s")
    waiting = await until_status(client, started["id"], "waiting")
    assert waiting["current_step"] == "docs"
    assert waiting["waiting_for"]["kind"] == "signal"
    assert waiting["waiting_for"]["detail"] == "signal docsValidated"
    resp = await signal(client, started["id"], {"ok": True, "by": "clerk"})
    assert resp.status == 202
    moved = await until_status(client, started["id"], "waiting")
    await until(lambda: _at_step(client, started["id"], "again"))
    moved = await process(client, started["id"])
    assert moved["outputs"]["docs"] == {"ok": True, "by": "clerk"}
    assert [b for _, p, b, _ in calls.seen if p == "/approve"] == [{"ok": True, "by": "clerk"}]
    resp = await signal(client, started["id"])  # an empty body is {}
    assert resp.status == 202
    done = await until_status(client, started["id"], "completed")
    assert done["outputs"]["again"] == {}


async def test_a_signal_that_comes_early_is_kept_and_taken_once(
    up: Start, make_config: Callable[..., Config]
) -> None:
    client = await up(make_config(workflows=[EARLY]))
    started = await start(client, "Early", {}, wait="0s")
    assert (await signal(client, started["id"], {"n": 1})).status == 202  # still in its delay
    done = await until_status(client, started["id"], "failed")
    assert done["outputs"]["docs"] == {"n": 1}
    assert done["error"]["step"] == "again"  # the one signal went to the first wait only
    assert done["error"]["message"] == "no docsValidated signal within 0.3s"


async def test_signals_survive_a_restart_kept_or_awaited(
    up: Start, make_config: Callable[..., Config], clock: FakeClock
) -> None:
    config = make_config(workflows=[PERMIT, KEEP])
    client = await up(config)
    kept = await start(client, "Keep", {}, wait="0s")
    awaited = await start(client, "Permit", {}, wait="0s")
    await until_status(client, kept["id"], "waiting")
    before = await until_status(client, awaited["id"], "waiting")
    assert (await signal(client, kept["id"], {"n": 1})).status == 202  # before its wait
    await client.close()

    clock.advance(601)  # the delay has passed while the daemon was down
    client = await up(config)
    done = await until_status(client, kept["id"], "completed")
    assert done["outputs"]["docs"] == {"n": 1}
    waiting = await process(client, awaited["id"])
    assert waiting["waiting_for"] == before["waiting_for"]  # same signal, same timeout
    assert (await signal(client, awaited["id"], {"n": 2})).status == 202
    await until(lambda: _at_step(client, awaited["id"], "again"))
    assert (await process(client, awaited["id"]))["outputs"]["docs"] == {"n": 2}


async def test_signals_to_unknown_or_finished_processes_and_bad_bodies(
    up: Start, make_config: Callable[..., Config]
) -> None:
    client = await up(make_config(workflows=[PERMIT, PLAIN]))
    assert (await signal(client, "nope")).status == 404
    done = await start(client, "Plain", {})
    resp = await signal(client, done["id"], {"x": 1})
    assert resp.status == 409
    assert set((await resp.json())["error"]) == {"code", "message", "details"}
    started = await start(client, "Permit", {}, wait="0s")
    assert (await signal(client, started["id"], [1, 2])).status == 422
    bad = await client.post(f"/v1/processes/{started['id']}/signals/no%20spaces", json={})
    assert bad.status == 400


async def test_a_signal_needs_the_signal_scope_of_the_workflow(
    start_daemon: Start, make_config: Callable[..., Config], service: TestServer
) -> None:
    client = await start_daemon(make_config(workflows=[PERMIT], server=AUTH))
    url = str(service.make_url("/"))
    put = await client.put(
        "/v1/services/ach/instances/i1", json={"url": url}, headers=bearer("admin-token")
    )
    assert put.status == 201
    resp = await client.post(
        "/v1/workflows/Permit", json={"input": {}}, headers=bearer("permit-token")
    )
    assert resp.status == 202
    process_id = (await resp.json())["id"]
    refused = await signal(client, process_id, {}, headers=bearer("other-token"))
    unknown = await signal(client, "0" * len(process_id), {}, headers=bearer("other-token"))
    assert refused.status == unknown.status == 404  # not yours reads as not there
    assert (await refused.json())["error"]["code"] == (await unknown.json())["error"]["code"]
    cancel = f"/v1/processes/{process_id}/cancel"
    assert (await client.post(cancel, headers=bearer("other-token"))).status == 404  # the same
    assert (await client.post(cancel, headers=bearer("permit-token"))).status == 403  # no cancel:
    assert (await signal(client, process_id, {}, headers=bearer("permit-token"))).status == 202


async def test_a_signal_that_comes_as_the_process_finishes_is_refused(
    up: Start, make_config: Callable[..., Config]
) -> None:
    client = await up(make_config(workflows=[PERMIT]))
    engine = client.app[ENGINE]
    started = await start(client, "Permit", {}, wait="0s")
    await until_status(client, started["id"], "waiting")
    add_signal = engine.store.add_signal

    async def finishing(
        process_id: str, name: str, data: bytes, at: float, by: str | None = None
    ) -> Signal:
        kept = await add_signal(process_id, name, data, at, by)
        await engine.cancel(process_id, by="test")  # it finishes while the signal is written
        await engine.wait(process_id, 10)  # set when it is forgotten
        return kept

    engine.store.add_signal = finishing  # type: ignore[method-assign]
    resp = await signal(client, started["id"], {"n": 1})
    assert resp.status == 409  # not "kept": nothing will ever take it
    assert (await resp.json())["error"]["code"] == "conflict"


async def _at_step(client: AppClient, process_id: str, step: str) -> bool:
    seen = await process(client, process_id)
    return seen["current_step"] == step and seen["status"] == "waiting"


# -- definitions API and versions ---------------------------------------------------------

DEPLOYED = {
    "steps": [
        {"name": "submit", "call": {"service": "ach", "path": "/submit"}},
        {"name": "docs", "wait_for": {"signal": "docsValidated", "timeout": "1h"}},
    ],
}
CHANGED = {
    "steps": [
        {"name": "submit", "call": {"service": "ach", "path": "/submit-v2"}},
        {"name": "docs", "wait_for": {"signal": "docsValidated", "timeout": "1h"}},
        {"name": "approve", "call": {"service": "ach", "path": "/approve"}},
    ],
}


async def define(client: AppClient, name: str, body: Any, **kw: Any) -> Any:
    return await client.put(f"/v1/workflows/{name}", json=body, **kw)


async def test_a_deployed_definition_is_versioned_and_processes_keep_theirs(
    up: Start, config: Config, calls: Calls
) -> None:
    client = await up(config)
    created = await define(client, "Deployed", DEPLOYED)
    assert created.status == 201
    first = await created.json()
    assert (first["name"], first["version"], first["source"]) == ("Deployed", 1, "api")
    assert first["definition"]["steps"][0]["call"]["path"] == "/submit"
    again = await define(client, "Deployed", {**DEPLOYED, "name": "Deployed"})
    assert (again.status, (await again.json())["version"]) == (200, 1)  # the same: unchanged
    old = await start(client, "Deployed", {}, wait="0s")
    await until_status(client, old["id"], "waiting")

    changed = await define(client, "Deployed", CHANGED)
    assert (changed.status, (await changed.json())["version"]) == (200, 2)
    new = await start(client, "Deployed", {}, wait="0s")
    await until_status(client, new["id"], "waiting")
    assert (await process(client, old["id"]))["workflow_version"] == 1
    assert (await process(client, new["id"]))["workflow_version"] == 2
    listed = (await (await client.get("/v1/workflows")).json())["workflows"]
    assert {w["name"]: (w["version"], w["source"]) for w in listed}["Deployed"] == (2, "api")
    slo = await client.get("/v1/workflows/Deployed/slo")
    assert slo.status == 200 and (await slo.json())["objective"] == 99.0
    await client.close()

    client = await up(config)  # a restart keeps every version
    got = await (await client.get("/v1/workflows/Deployed")).json()
    assert (got["version"], got["source"]) == (2, "api")
    assert [s["name"] for s in got["definition"]["steps"]] == ["submit", "docs", "approve"]
    assert (await client.get("/v1/workflows/Deployed/slo")).status == 200
    for p in (old, new):
        assert (await signal(client, p["id"], {})).status == 202
    done_old = await until_status(client, old["id"], "completed")
    done_new = await until_status(client, new["id"], "completed")
    assert [s["name"] for s in done_old["steps"]] == ["submit", "docs"]  # version 1's steps
    assert "approve" in done_new["outputs"]
    assert calls.paths().count("/approve") == 1 and calls.paths()[:2] == ["/submit", "/submit-v2"]


async def test_config_definitions_get_a_new_version_only_when_changed(
    up: Start, make_config: Callable[..., Config]
) -> None:
    client = await up(make_config(workflows=[PERMIT]))
    old = await start(client, "Permit", {}, wait="0s")
    await until_status(client, old["id"], "waiting")
    assert (await (await client.get("/v1/workflows/Permit")).json())["version"] == 1
    await client.close()

    client = await up(make_config(workflows=[PERMIT]))  # unchanged: still version 1
    got = await (await client.get("/v1/workflows/Permit")).json()
    assert (got["version"], got["source"]) == (1, "config")
    await client.close()

    shorter = {**PERMIT, "steps": PERMIT["steps"][:2]}
    client = await up(make_config(workflows=[shorter]))
    assert (await (await client.get("/v1/workflows/Permit")).json())["version"] == 2
    assert (await process(client, old["id"]))["workflow_version"] == 1
    assert (await signal(client, old["id"], {"n": 1})).status == 202
    await until(lambda: _at_step(client, old["id"], "again"))  # version 1 goes on to "again"


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_a_stored_version_that_no_longer_parses_fails_its_processes_only(
    up: Start, make_config: Callable[..., Config], calls: Calls
) -> None:
    config = make_config(workflows=[PERMIT])
    client = await up(config)
    old = await start(client, "Permit", {}, wait="0s")
    await until_status(client, old["id"], "waiting")
    await client.close()
    with sqlite3.connect(Path(config.storage.path)) as db:  # as a newer schema would refuse
        [(spec,)] = db.execute("SELECT spec FROM workflow_definitions WHERE name = 'Permit'")
        changed = json.loads(spec)
        changed["steps"][1]["removed_in_a_later_release"] = 1
        db.execute("UPDATE workflow_definitions SET spec = ?", [json.dumps(changed)])
    db.close()

    client = await up(config)  # the daemon starts; today's definition is the next version
    got = await (await client.get("/v1/workflows/Permit")).json()
    assert (got["version"], got["source"]) == (2, "config")
    failed = await until_status(client, old["id"], "failed")  # not run on version 2
    assert failed["workflow_version"] == 1
    assert "Permit" in failed["error"]["message"]
    assert calls.paths().count("/approve") == 0
    new = await start(client, "Permit", {}, wait="0s")
    assert (await until_status(client, new["id"], "waiting"))["workflow_version"] == 2


async def test_concurrent_deploys_of_a_definition_make_one_version(
    up: Start, config: Config
) -> None:
    client = await up(config)
    same = await asyncio.gather(*(define(client, "Deployed", DEPLOYED) for _ in range(4)))
    answers = sorted([(r.status, (await r.json())["version"]) for r in same])
    assert answers == [(200, 1), (200, 1), (200, 1), (201, 1)]
    bodies = [{**DEPLOYED, "deadline": f"{n}h"} for n in range(1, 5)]
    changed = await asyncio.gather(*(define(client, "Deployed", body) for body in bodies))
    assert sorted([(await r.json())["version"] for r in changed]) == [2, 3, 4, 5]
    assert {r.status for r in changed} == {200}
    routed = {**DEPLOYED, "route": "/api/permits"}
    both = await asyncio.gather(define(client, "A", routed), define(client, "B", routed))
    assert sorted(r.status for r in both) == [201, 422]  # one route, one workflow


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_a_reload_the_store_refuses_changes_no_definition(
    up: Start, make_config: Callable[..., Config]
) -> None:
    client = await up(make_config(workflows=[PERMIT, PLAIN]))
    engine, db = client.app[ENGINE], client.app[DATABASE]
    before = dict(engine.definitions)
    shorter = {**PERMIT, "steps": PERMIT["steps"][:2]}
    changed = make_config(workflows=[shorter, {**PLAIN, "steps": PLAIN["steps"][:1]}])

    stored = await engine.store.definitions()

    def refuse_plain(d: Any) -> None:  # the second version's write fails, the first's not
        d.conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON workflow_definitions WHEN NEW.name = 'Plain' "
            "BEGIN SELECT RAISE(ABORT, 'the disk is full'); END"
        )

    await db.write(refuse_plain)
    with pytest.raises(sqlite3.IntegrityError):
        await engine.configure(definitions_from_config(changed))
    await db.write(lambda d: d.conn.execute("DROP TRIGGER refuse"))
    assert await engine.store.definitions() == stored  # no half of it stored
    assert engine.definitions == before  # nor in force
    got = await (await client.get("/v1/workflows/Plain")).json()
    assert (got["version"], len(got["definition"]["steps"])) == (1, 2)
    await engine.configure(definitions_from_config(changed))  # applied again: whole
    listed = (await (await client.get("/v1/workflows")).json())["workflows"]
    assert {w["name"]: w["version"] for w in listed} == {"Permit": 2, "Plain": 2}


async def test_a_bad_definition_is_refused_naming_the_path_of_the_field(
    up: Start, config: Config
) -> None:
    client = await up(config)
    bad = {"steps": [DEPLOYED["steps"][0], {"name": "pay", "call": {"path": "/x"}}]}
    resp = await define(client, "Bad", bad)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert {"path": "steps.1.call.service", "message": "Field required"} in error["details"]
    assert "steps.1.call.service" in error["message"]
    resp = await define(client, "Bad", {**DEPLOYED, "colour": "red"})
    assert {"path": "colour", "message": "unknown key"} in (await resp.json())["error"]["details"]
    resp = await define(client, "Bad", {**DEPLOYED, "respond_after": "nope"})
    [problem] = (await resp.json())["error"]["details"]
    assert problem["path"] == "respond_after"
    resp = await define(client, "Bad", {**DEPLOYED, "name": "Other"})
    assert resp.status == 422 and (await resp.json())["error"]["details"][0]["path"] == "name"
    assert (await define(client, "Bad", [1])).status == 422
    assert (await define(client, "Routed", {**DEPLOYED, "route": "/api/permits"})).status == 201
    resp = await define(client, "Bad", {**DEPLOYED, "route": "/api/permits"})
    assert (await resp.json())["error"]["details"][0]["path"] == "route"
    routed = await client.post("/api/permits", json={"who": "A-7"})  # the router serves it
    assert routed.status == 202
    assert (await client.get("/v1/workflows/Bad")).status == 404


async def test_the_definition_view_hides_header_values(up: Start, config: Config) -> None:
    client = await up(config)
    call = {"service": "ach", "path": "/x", "headers": {"Authorization": "Bearer s3cret"}}
    steps = [{"name": "a", "call": call, "compensate": call}]
    assert (await define(client, "Secret", {"steps": steps})).status == 201
    text = await (await client.get("/v1/workflows/Secret")).text()
    assert "s3cret" not in text
    shown = (await (await client.get("/v1/workflows/Secret")).json())["definition"]["steps"][0]
    assert (
        shown["call"]["headers"] == shown["compensate"]["headers"] == {"Authorization": "(hidden)"}
    )


SECRET = {
    "name": "Pay",
    "steps": [
        {
            "name": "pay",
            "call": {
                "service": "ach",
                "path": "/pay-${ACH_KEY}",
                "body": {"auth": "Key ${ACH_KEY}", "price": "$$5"},
                "headers": {"Authorization": "Bearer ${ACH_KEY}"},
            },
        },
        {"name": "docs", "wait_for": {"signal": "docsValidated"}},
        {"name": "again", "call": {"service": "ach", "path": "/again-${ACH_KEY}"}},
    ],
}


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_secrets_from_the_environment_are_neither_stored_nor_served(
    up: Start, make_config: Callable[..., Config], calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACH_KEY", "s3cr3t-one")
    config = make_config(workflows=[SECRET])
    client = await up(config)
    got = await client.get("/v1/workflows/Pay")
    assert "s3cr3t" not in await got.text()
    call = (await got.json())["definition"]["steps"][0]["call"]
    assert (call["path"], call["body"]) == (
        "/pay-${ACH_KEY}",
        {"auth": "Key ${ACH_KEY}", "price": "$$5"},  # as written
    )
    old = await start(client, "Pay", {}, wait="0s")
    await until_status(client, old["id"], "waiting")
    assert calls.seen[-1][1:3] == ("/pay-s3cr3t-one", {"auth": "Key s3cr3t-one", "price": "$5"})
    await client.close()

    def stored() -> str:
        with sqlite3.connect(Path(config.storage.path)) as db:
            specs = str(
                db.execute("SELECT name, version, spec FROM workflow_definitions").fetchall()
            )
        db.close()
        return specs

    assert "s3cr3t" not in stored()
    monkeypatch.setenv("ACH_KEY", "s3cr3t-two")  # the secret is rotated
    client = await up(make_config(workflows=[SECRET]))
    assert (await (await client.get("/v1/workflows/Pay")).json())["version"] == 1  # as written
    assert (await signal(client, old["id"], {})).status == 202
    await until_status(client, old["id"], "completed")
    assert calls.paths()[-1] == "/again-s3cr3t-two"  # today's value, in the version it runs
    assert "s3cr3t" not in stored()


async def test_a_name_config_yaml_defines_cannot_be_replaced(up: Start, config: Config) -> None:
    client = await up(config)
    resp = await define(client, "Plain", DEPLOYED)
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "conflict"
    got = await (await client.get("/v1/workflows/Plain")).json()
    assert (got["version"], got["source"]) == (1, "config")


async def test_defining_needs_the_define_scope(
    start_daemon: Start, make_config: Callable[..., Config]
) -> None:
    scoped = {
        "auth": {
            "tokens": [{"name": "deployer", "token": "deployer", "scopes": ["define:Deployed"]}]
        }
    }
    client = await start_daemon(make_config(server=scoped))
    assert (await define(client, "Deployed", DEPLOYED)).status == 401
    resp = await define(client, "Other", DEPLOYED, headers=bearer("deployer"))
    assert resp.status == 403
    assert (await define(client, "Deployed", DEPLOYED, headers=bearer("deployer"))).status == 201


async def test_a_config_reload_keeps_api_definitions_and_versions_what_changed(
    tmp_path: Path, start_watched: Callable[[Path], Awaitable[AppClient]]
) -> None:
    from .test_reload import reloaded

    def write(workflows: list[dict[str, Any]]) -> Path:
        path = tmp_path / "config.yaml"
        data = {"storage": {"path": str(tmp_path / "hms.db")}, "workflows": workflows}
        path.write_text(yaml.safe_dump(data))
        return path

    client = await start_watched(write([PLAIN]))
    assert (await define(client, "Deployed", DEPLOYED)).status == 201
    write([{**PLAIN, "steps": PLAIN["steps"][:1]}])
    await reloaded(client, "success")
    listed = (await (await client.get("/v1/workflows")).json())["workflows"]
    versions = {w["name"]: (w["version"], w["source"]) for w in listed}
    assert versions == {"Plain": (2, "config"), "Deployed": (1, "api")}
    assert (await client.get("/v1/workflows/Deployed/slo")).status == 200  # its SLO stays
