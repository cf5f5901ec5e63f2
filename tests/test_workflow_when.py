"""`when:` on a step: a workflow condition checked before the step runs; false skips it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config, ConfigError, parse_config

from .conftest import AppClient, metric_families
from .services import Calls
from .test_workflows import register, start

ESCALATION = {
    "name": "Escalation",
    "steps": [
        {"name": "validate", "call": {"service": "applications", "path": "/validate"}},
        {
            "name": "escalate",
            "when": "[input.priority] == urgent",
            "call": {"service": "applications", "path": "/escalate"},
            "compensate": {"service": "applications", "path": "/deescalate"},
        },
        {
            "name": "notify",
            "when": ["[steps.validate.valid] == true", "[input.amount] > 10"],
            "delay": "50ms",
            "call": {"service": "applications", "path": "/notify"},
        },
        {"name": "close", "call": {"service": "applications", "path": "/close"}},
    ],
}


@pytest.fixture
async def client(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> AppClient:
    client = await start_daemon(make_config(workflows=[ESCALATION]))
    await register(client, "applications", "i1", str(service.make_url("/")))
    return client


async def test_a_step_whose_condition_holds_runs(client: AppClient, calls: Calls) -> None:
    done = await start(client, "Escalation", {"input": {"priority": "urgent", "amount": 50}})
    assert done["status"] == "completed"
    assert calls.paths() == ["/validate", "/escalate", "/notify", "/close"]
    assert [s["state"] for s in done["steps"]] == ["completed"] * 4
    assert all(a["outcome"] == "ok" for a in done["history"])


async def test_a_step_whose_condition_fails_is_skipped_and_the_process_goes_on(
    client: AppClient, calls: Calls
) -> None:
    done = await start(client, "Escalation", {"input": {"priority": "low", "amount": 5}})
    assert done["status"] == "completed"
    assert calls.paths() == ["/validate", "/close"]  # neither skipped step called
    lines = [(a["step"], a["outcome"], a["error"]) for a in done["history"]]
    assert lines == [
        ("validate", "ok", None),
        ("escalate", "skipped", "[input.priority] == urgent (got low)"),
        ("notify", "skipped", "[input.amount] > 10 (got 5)"),  # the first that failed
        ("close", "ok", None),
    ]
    assert done["steps"][1] == {
        "name": "escalate",
        "state": "skipped",
        "reason": "[input.priority] == urgent (got low)",
    }
    assert [s["state"] for s in done["steps"]] == ["completed", "skipped", "skipped", "completed"]
    assert "escalate" not in done["outputs"] and "notify" not in done["outputs"]
    families = await metric_families(client)
    skipped = {
        s.labels["step"]: s.value
        for s in families["hms_workflow_step_attempts"].samples
        if s.labels.get("result") == "skipped" and s.name.endswith("_total")
    }
    assert skipped == {"escalate": 1.0, "notify": 1.0}


async def test_a_skipped_step_is_not_compensated(client: AppClient, calls: Calls) -> None:
    calls.fail["/close"] = [400]
    done = await start(client, "Escalation", {"input": {"priority": "low", "amount": 50}})
    assert done["status"] == "failed"  # escalate (the only compensable step) was skipped
    assert "/deescalate" not in calls.paths()
    assert calls.paths() == ["/validate", "/notify", "/close"]

    calls.seen.clear()
    calls.fail["/close"] = [400]
    done = await start(client, "Escalation", {"input": {"priority": "urgent", "amount": 50}})
    assert done["status"] == "compensated"
    assert calls.paths()[-1] == "/deescalate"


BAD_WHEN = """
workflows:
  - name: W
    steps:
      - name: a
        when: "[steps.b.x] == 1"
        publish: a.done
      - name: b
        publish: b.done
      - name: c
        when: ["[input.x] == 1", "[input.y] >< 1"]
        publish: c.done
"""


def test_a_bad_condition_is_a_config_error_at_its_key_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BAD_WHEN)
    errors = caught.value.errors
    assert any(
        ":6: workflows[0].steps[0].when:" in e and "'b', which does not run before" in e
        for e in errors
    ), errors
    assert any(":11: workflows[0].steps[2].when[1]:" in e for e in errors), errors


async def test_a_bad_condition_is_refused_by_the_api(client: AppClient) -> None:
    spec = {
        "steps": [
            {"name": "a", "when": "[steps.a.x] == 1", "publish": "a.done"},
            {"name": "b", "when": "[input.x] >< 1", "publish": "b.done"},
        ]
    }
    resp = await client.put("/v1/workflows/Bad", json=spec)
    assert resp.status == 422
    paths = [d["path"] for d in (await resp.json())["error"]["details"]]
    assert paths == ["steps.0.when", "steps.1.when"]
